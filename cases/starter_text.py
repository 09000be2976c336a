"""Teaching text of the starter library, one `Topic` per structure and modality.

Written for the actual images in assets/medimages (see its PROVENANCE.md): the MNI152 template is one
normal adult brain, the pydicom files are de-identified samples without clinical history, and the
"lesion" records are SIMULATED discs painted into the template. The vignettes say so instead of
inventing patients.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Closed:
    """A closed (multiple-choice) question; `answer` must be one of `choices`."""

    prompt: str
    choices: tuple[str, ...]
    answer: str
    synonyms: tuple[str, ...] = ()


@dataclass(frozen=True)
class Open:
    """An open question with a reference answer and accepted synonyms."""

    prompt: str
    answer: str
    synonyms: tuple[str, ...] = ()


@dataclass(frozen=True)
class Topic:
    """Teaching text for one structure in one modality (shared by the cases that show it)."""

    anatomy: str
    plane: str
    vignette: str
    findings: str
    discussion: str
    key_points: tuple[str, ...]
    tags: tuple[str, ...]
    closed: Closed
    open: Open | None = None
    window_preset: str | None = None


PLANE_QUESTION = {
    plane: Closed(
        prompt="In which anatomical plane was this slice taken?",
        choices=("axial", "coronal", "sagittal"),
        answer=plane,
        synonyms=(("transverse",) if plane == "axial" else ()),
    )
    for plane in ("axial", "coronal", "sagittal")
}

_MNI_VIGNETTE = (
    "Teaching atlas image: a slice of the MNI ICBM152 2009 T1-weighted template, an average of many "
    "healthy adult brains registered to a common space (1 mm voxels). There is no patient and no "
    "clinical history; use it to learn normal anatomy and how segmentations are drawn."
)

TOPICS: dict[str, Topic] = {
    "ct-bone": Topic(
        anatomy="spine",
        plane="axial",
        window_preset="bone",
        vignette=(
            "De-identified sample CT (pydicom test file CT_small.dcm): a single axial slice through the "
            "spine of an adult. No clinical history is available."
        ),
        findings=(
            "The vertebra is seen in cross-section: the vertebral body anteriorly, the spinal canal "
            "behind it, and the posterior elements (pedicles, laminae, spinous process) posteriorly. "
            "Cortical bone is the densest tissue on the slice; paraspinal muscles are intermediate and "
            "fat is dark. No fracture line or destructive lesion is shown on this single slice."
        ),
        discussion=(
            "CT numbers are Hounsfield units (HU): water 0, fat about -100, muscle about +40, and bone "
            "from about +300 (trabecular) to over +1000 (cortical). A bone window (e.g. W 2500 / L 480) "
            "spreads the grey scale over bone so cortical outlines and fracture lines are visible; a "
            "soft-tissue window (W 400 / L 40) makes all bone look uniformly white. The reference mask "
            "here is a threshold at 250 HU inside the body: quick and reproducible, but it misses "
            "osteoporotic trabecular bone and would also catch calcifications or dense contrast."
        ),
        key_points=(
            "Bone is the highest-attenuation tissue on non-contrast CT (hundreds to >1000 HU).",
            "Use a bone window to assess cortex and fractures; a soft-tissue window for muscle and fat.",
            "Threshold masks depend on the HU cut-off: state it when you report a bone volume.",
        ),
        tags=("CT", "musculoskeletal", "spine", "Hounsfield units", "windowing"),
        closed=Closed(
            prompt="Which window preset best shows the cortical outline of the vertebra?",
            choices=(
                "bone (W 2500 / L 480)",
                "brain (W 80 / L 40)",
                "lung (W 1500 / L -600)",
                "soft tissue (W 400 / L 40)",
            ),  # fmt: skip
            answer="bone (W 2500 / L 480)",
            synonyms=("bone", "bone window"),
        ),
        open=Open(
            prompt="Name the parts of the vertebra that you can identify on this slice.",
            answer="vertebral body, pedicles, laminae and spinous process",
            synonyms=("vertebral body and posterior elements", "body, pedicles, laminae, spinous process"),
        ),
    ),
    "ct-body": Topic(
        anatomy="spine",
        plane="axial",
        window_preset="soft tissue",
        vignette=(
            "De-identified sample CT (pydicom test file CT_small.dcm): a single axial slice. Before any "
            "organ is contoured, the body outline (external contour) is defined."
        ),
        findings=(
            "The body is everything denser than the surrounding air: skin, fat, muscle and bone. Outside "
            "it lie air (about -1000 HU) and parts of the scanner table."
        ),
        discussion=(
            "The external contour is the first structure drawn in radiotherapy planning and the usual "
            "first step of automatic segmentation pipelines: it limits later searches to the patient and "
            "removes the table. The reference mask thresholds at -300 HU (between air and fat), keeps the "
            "largest connected component, so the table is dropped, and fills holes such as airways."
        ),
        key_points=(
            "Air is about -1000 HU, fat about -100 HU: a threshold between them separates body from air.",
            "Keep the largest connected component to discard the scanner table and noise.",
            "Fill internal holes (airways, bowel gas) so the body mask is solid.",
        ),
        tags=("CT", "body contour", "radiotherapy", "Hounsfield units"),
        closed=Closed(
            prompt="Which of these has the lowest attenuation (most negative HU) on CT?",
            choices=("air", "fat", "muscle", "bone"),
            answer="air",
        ),
        open=Open(
            prompt="Why is the scanner table not part of the body mask?",
            answer="it is not connected to the body so the largest connected component excludes it",
            synonyms=("largest connected component", "it is a separate component"),
        ),
    ),
    "mr-liver-lesion": Topic(
        anatomy="liver",
        plane="axial",
        vignette=(
            "De-identified sample abdominal MRI (pydicom test file examples_overlay.dcm, study described "
            "as 'abdomen, liver marked lesion'). A focal lesion in the liver was outlined by the reader "
            "with a DICOM overlay. No history is available."
        ),
        findings=(
            "Axial MR image of the upper abdomen at the level of the liver and both kidneys. A small, "
            "round, well-defined focal lesion lies in the right lobe of the liver, with signal different "
            "from the surrounding parenchyma. The kidneys, spleen and vertebral body are also seen."
        ),
        discussion=(
            "A focal liver lesion cannot be characterised from one slice of one sequence. The common "
            "differential is cyst, haemangioma, focal nodular hyperplasia, adenoma, metastasis and "
            "hepatocellular carcinoma (in a cirrhotic liver). Characterisation uses T2 signal, "
            "diffusion, and the enhancement pattern over arterial, portal venous, delayed (and, with "
            "hepatobiliary agents, hepatobiliary) phases, together with the clinical context (known "
            "primary tumour, cirrhosis). The reference mask is the reader's overlay contour, filled."
        ),
        key_points=(
            "Describe a focal liver lesion by segment, size, margins, signal and enhancement pattern.",
            "Multiphase contrast imaging and clinical context are needed to characterise it.",
            "DICOM overlays (group 60xx) can carry annotations: they are removed during de-identification.",
        ),
        tags=("MRI", "abdomen", "liver", "focal lesion"),
        closed=Closed(
            prompt="In which organ is the marked lesion?",
            choices=("liver", "spleen", "right kidney", "pancreas"),
            answer="liver",
        ),
        open=Open(
            prompt="List two diagnoses in the differential of a small, well-defined focal liver lesion.",
            answer="cyst and haemangioma",
            synonyms=("haemangioma and metastasis", "cyst and metastasis", "hemangioma and cyst"),
        ),
    ),
    "mni-brain": Topic(
        anatomy="brain",
        plane="axial",
        vignette=_MNI_VIGNETTE,
        findings=(
            "T1-weighted contrast: white matter is brighter than grey matter, and cerebrospinal fluid "
            "(ventricles, sulci) is dark. The brain is surrounded by dark CSF; scalp and skull have been "
            "removed from this template."
        ),
        discussion=(
            "A brain mask (skull stripping) separates brain tissue from everything else and is the first "
            "step of almost every neuroimaging pipeline: registration, tissue segmentation and volumetry "
            "all depend on it. Errors at the brain surface (leaving dura or removing cortex) propagate to "
            "cortical thickness and volume measurements. The reference is the ICBM152 2009 brain mask."
        ),
        key_points=(
            "On T1-weighted MRI, white matter is brighter than grey matter and CSF is dark.",
            "Skull stripping comes first in most neuroimaging pipelines; check its edges visually.",
            "Include the cerebellum and brainstem in a whole-brain mask.",
        ),
        tags=("MRI", "neuro", "brain", "skull stripping", "normal anatomy"),
        closed=PLANE_QUESTION["axial"],
        open=Open(
            prompt="On T1-weighted MRI, which is brighter: grey matter or white matter?",
            answer="white matter",
            synonyms=("white", "wm"),
        ),
    ),
    "mni-grey-matter": Topic(
        anatomy="brain",
        plane="axial",
        vignette=_MNI_VIGNETTE,
        findings=(
            "Grey matter forms the cortical ribbon that follows the gyri and sulci, and the deep grey "
            "nuclei (caudate, putamen, thalamus) where they are in the slice. It is darker than white "
            "matter on T1-weighted images."
        ),
        discussion=(
            "Grey-matter segmentation underlies cortical thickness and voxel-based morphometry studies of "
            "atrophy (for example in Alzheimer disease). The reference mask thresholds the ICBM152 "
            "grey-matter probability map at 0.5; the thin cortical ribbon makes partial-volume effects "
            "large, so small boundary disagreements cost a lot of Dice."
        ),
        key_points=(
            "Grey matter = cortex plus deep grey nuclei; it is intermediate in signal on T1.",
            "Partial volume at the thin cortical ribbon makes grey-matter Dice lower than whole-brain Dice.",
            "Atrophy shows as thinner cortex and wider sulci and ventricles.",
        ),
        tags=("MRI", "neuro", "grey matter", "cortex", "normal anatomy"),
        closed=Closed(
            prompt="On this T1-weighted image, how does grey matter compare with white matter?",
            choices=("darker", "brighter", "the same"),
            answer="darker",
        ),
        open=Open(
            prompt="Name one deep grey-matter nucleus.",
            answer="thalamus",
            synonyms=("caudate", "caudate nucleus", "putamen", "globus pallidus", "lentiform nucleus"),
        ),
    ),
    "mni-white-matter": Topic(
        anatomy="brain",
        plane="axial",
        vignette=_MNI_VIGNETTE,
        findings=(
            "White matter lies deep to the cortical ribbon and is the brightest brain tissue on this "
            "T1-weighted image. It includes the corpus callosum, the internal capsules and the centrum "
            "semiovale, depending on the level of the slice."
        ),
        discussion=(
            "White matter is bright on T1 because of the fat-rich myelin sheaths. Its volume and the "
            "lesions within it (for example multiple sclerosis plaques or small-vessel disease) are "
            "measured on segmentations like this one. The reference thresholds the ICBM152 white-matter "
            "probability map at 0.5."
        ),
        key_points=(
            "Myelin makes white matter bright on T1-weighted images.",
            "Major white-matter structures: corpus callosum, internal capsule, centrum semiovale.",
            "White-matter lesions are counted and measured inside a white-matter mask.",
        ),
        tags=("MRI", "neuro", "white matter", "myelin", "normal anatomy"),
        closed=Closed(
            prompt="Which tissue is brightest on this T1-weighted brain image?",
            choices=("white matter", "grey matter", "cerebrospinal fluid"),
            answer="white matter",
        ),
        open=Open(
            prompt="Why does white matter appear bright on T1-weighted MRI?",
            answer="myelin",
            synonyms=("fatty myelin", "because of myelin", "lipid-rich myelin"),
        ),
    ),
    "mni-synthetic-lesion": Topic(
        anatomy="brain",
        plane="axial",
        vignette=(
            "SIMULATED CASE for practice. A small dark disc was painted into a normal MNI152 T1-weighted "
            "template to mimic a focal T1-hypointense lesion. It is not a real patient or a real lesion."
        ),
        findings=(
            "A single small, round, T1-hypointense focus lies in the cerebral white matter; the rest of "
            "the slice is normal template anatomy."
        ),
        discussion=(
            "Real focal T1-hypointense white-matter lesions include chronic multiple-sclerosis plaques "
            "('black holes'), lacunar infarcts and dilated perivascular spaces; they are told apart by "
            "their shape, location, FLAIR and T2 signal, diffusion and the clinical picture, none of "
            "which a single simulated T1 slice provides. Small lesions are where segmentation scores "
            "are most fragile: a boundary off by one pixel changes Dice a lot."
        ),
        key_points=(
            "Report a focal lesion by location, size, shape and signal on each sequence.",
            "One T1 slice cannot characterise a white-matter lesion: FLAIR/T2 and DWI are needed.",
            "Dice is very sensitive to boundary errors on small structures.",
        ),
        tags=("MRI", "neuro", "simulated", "white matter lesion"),
        closed=Closed(
            prompt="Is a focal lesion present on this slice?",
            choices=("yes", "no"),
            answer="yes",
        ),
        open=Open(
            prompt="Describe the signal of the lesion relative to white matter on this T1-weighted image.",
            answer="hypointense",
            synonyms=("dark", "low signal", "t1 hypointense", "darker"),
        ),
    ),
    "fluo-nuclei": Topic(
        anatomy="cell nuclei",
        plane="en face",
        vignette=(
            "Fluorescence microscopy of cultured cells with a DNA stain (2018 Data Science Bowl image "
            "shipped with stardist). A tile of the field is shown."
        ),
        findings=(
            "Oval bright nuclei on a dark background; some are clustered and touching, and brightness "
            "varies between nuclei with DNA content and focus."
        ),
        discussion=(
            "Nuclear segmentation is the basis of cell counting and morphometry. Simple thresholding "
            "works for isolated nuclei but merges touching ones; instance methods (watershed, StarDist's "
            "star-convex polygons) separate them. The reference here is the union of the expert-annotated "
            "nuclei, so the quiz scores foreground, not the separation of touching nuclei."
        ),
        key_points=(
            "DNA stains (DAPI, Hoechst) make nuclei bright in fluorescence images.",
            "Touching nuclei are the hard part of nuclear segmentation.",
            "Semantic (foreground) and instance (one label per nucleus) masks answer different questions.",
        ),
        tags=("microscopy", "fluorescence", "nuclei", "cell counting"),
        closed=Closed(
            prompt="What do the bright objects in this fluorescence image represent?",
            choices=("cell nuclei", "red blood cells", "bacteria", "air bubbles"),
            answer="cell nuclei",
            synonyms=("nuclei",),
        ),
        open=Open(
            prompt="Why does simple thresholding give too few nuclei when counting?",
            answer="touching nuclei merge into one object",
            synonyms=("touching nuclei merge", "clustered nuclei merge", "overlapping nuclei are merged"),
        ),
    ),
    "fundus-vessels": Topic(
        anatomy="retina",
        plane="en face",
        vignette=(
            "Colour fundus photograph of a right or left eye (scikit-image sample 'retina', CC0), "
            "downsized. No history is available."
        ),
        findings=(
            "The optic disc is the bright round area at the side of the image; the retinal arteries and "
            "veins emerge from it and branch over the posterior pole. The darker macula with the fovea "
            "lies temporal to the disc near the image centre."
        ),
        discussion=(
            "Retinal vessels are the only blood vessels that can be seen directly and non-invasively. "
            "Vessel calibre, tortuosity and branching change in hypertension and diabetes, so vessel "
            "segmentation is a classic benchmark (DRIVE, STARE). Veins are darker and wider than arteries. "
            "The reference mask is a ridge filter on the green channel, where vessels have the most "
            "contrast: the smallest capillaries are missed."
        ),
        key_points=(
            "Vessels are most contrasted in the green channel of a colour fundus photograph.",
            "Retinal veins are wider and darker than the accompanying arteries.",
            "Vessel changes reflect systemic disease (hypertension, diabetes).",
        ),
        tags=("ophthalmology", "fundus", "retina", "vessels"),
        closed=Closed(
            prompt="From which structure do the retinal vessels emerge?",
            choices=("optic disc", "fovea", "macula", "ora serrata"),
            answer="optic disc",
            synonyms=("optic nerve head",),
        ),
        open=Open(
            prompt="Which vessels are wider and darker: retinal arteries or veins?",
            answer="veins",
            synonyms=("retinal veins", "the veins"),
        ),
    ),
    "fundus-disc": Topic(
        anatomy="retina",
        plane="en face",
        vignette=(
            "Colour fundus photograph (scikit-image sample 'retina', CC0), downsized. Locate the optic "
            "nerve head."
        ),
        findings=(
            "The optic disc is the bright, round, yellow-white area where the vessels converge. The "
            "macula lies about two and a half disc diameters temporal to it."
        ),
        discussion=(
            "The optic disc is where the retinal ganglion-cell axons leave the eye; it has no "
            "photoreceptors, giving the physiological blind spot. Its central cup enlarges in glaucoma "
            "(raised cup-to-disc ratio) and its margins blur in papilloedema. The reference mask takes the "
            "brightest 1% of the smoothed image, which finds the disc but not the cup boundary."
        ),
        key_points=(
            "The optic disc is the brightest round structure on a normal fundus photograph.",
            "Cup-to-disc ratio is the key glaucoma measurement; blurred margins suggest disc swelling.",
            "The fovea lies about 2.5 disc diameters temporal to the disc.",
        ),
        tags=("ophthalmology", "fundus", "optic disc", "glaucoma"),
        closed=Closed(
            prompt="Which condition typically enlarges the optic cup?",
            choices=("glaucoma", "cataract", "myopia", "conjunctivitis"),
            answer="glaucoma",
        ),
        open=Open(
            prompt="Why is the optic disc a blind spot?",
            answer="it has no photoreceptors",
            synonyms=("no photoreceptors", "no rods or cones", "there are no rods and cones"),
        ),
    ),
    "he-nuclei": Topic(
        anatomy="tissue",
        plane="en face",
        vignette=(
            "Haematoxylin and eosin (H&E) stained tissue section (TCIA image shipped with stardist); a "
            "tile is shown."
        ),
        findings=(
            "Purple-blue nuclei (haematoxylin) sit in pink cytoplasm and stroma (eosin). The nuclei vary "
            "in size and shape and many are crowded."
        ),
        discussion=(
            "Haematoxylin binds nucleic acids and stains nuclei blue-purple; eosin stains proteins in "
            "cytoplasm and extracellular matrix pink. Nuclear size, shape and crowding (pleomorphism, "
            "nuclear-to-cytoplasmic ratio) are central to grading tumours, and nuclear segmentation is "
            "the first step of computational pathology. The reference mask uses colour deconvolution to "
            "isolate the haematoxylin channel and then a threshold."
        ),
        key_points=(
            "H&E: nuclei blue-purple (haematoxylin), cytoplasm and stroma pink (eosin).",
            "Nuclear pleomorphism and crowding are features of malignancy.",
            "Colour deconvolution separates stains before segmentation.",
        ),
        tags=("pathology", "histology", "H&E", "nuclei"),
        closed=Closed(
            prompt="Which stain colours the nuclei blue-purple in this section?",
            choices=("haematoxylin", "eosin", "DAB", "Giemsa"),
            answer="haematoxylin",
            synonyms=("hematoxylin",),
        ),
        open=Open(
            prompt="What does eosin stain?",
            answer="cytoplasm and extracellular proteins",
            synonyms=("cytoplasm", "proteins", "stroma", "cytoplasm and stroma"),
        ),
    ),
    "ihc-dab": Topic(
        anatomy="colon",
        plane="en face",
        vignette=(
            "Immunohistochemistry of colonic tissue: DAB (brown) marks the target protein FHL2, with a "
            "haematoxylin (blue) counterstain (scikit-image sample); a tile is shown."
        ),
        findings=(
            "Brown DAB staining is present in the cells of the colonic glands; blue counterstained nuclei "
            "are visible where the brown staining is weak."
        ),
        discussion=(
            "In immunohistochemistry an antibody binds the protein of interest and an enzyme converts DAB "
            "into a brown precipitate at that site; haematoxylin counterstains nuclei blue for orientation. "
            "Scoring considers the fraction of positive cells, staining intensity and its compartment "
            "(membrane, cytoplasm, nucleus). The reference mask is the DAB channel from colour "
            "deconvolution above an Otsu threshold."
        ),
        key_points=(
            "Brown DAB = where the antibody's target protein is; blue = haematoxylin counterstain.",
            "IHC scores report the positive fraction, intensity and the stained compartment.",
            "Colour deconvolution separates DAB from haematoxylin for quantification.",
        ),
        tags=("pathology", "immunohistochemistry", "DAB", "colon"),
        closed=Closed(
            prompt="What does the brown colour in this immunohistochemistry image indicate?",
            choices=("the target protein (DAB)", "nuclei (haematoxylin)", "collagen", "blood"),
            answer="the target protein (DAB)",
            synonyms=("DAB", "target protein", "protein"),
        ),
        open=Open(
            prompt="What is the purpose of the blue haematoxylin counterstain?",
            answer="to show the nuclei for orientation",
            synonyms=("nuclei", "shows nuclei", "orientation"),
        ),
    ),
    "ihc-nuclei": Topic(
        anatomy="colon",
        plane="en face",
        vignette=(
            "Immunohistochemistry of colonic tissue with a haematoxylin counterstain (scikit-image "
            "sample). Find the counterstained nuclei."
        ),
        findings=(
            "Blue haematoxylin-stained nuclei are visible among brown DAB-positive cells; where the "
            "brown staining is strong, nuclei are partly hidden."
        ),
        discussion=(
            "Counting nuclei gives the denominator for an IHC positivity index (positive cells / all "
            "cells). When a strong brown stain covers the nucleus, the blue signal is masked, so naive "
            "nuclear masks under-count positive cells; the reference mask here deliberately excludes "
            "nuclei under DAB, which is a known limitation."
        ),
        key_points=(
            "Positivity index = DAB-positive cells / all counted cells.",
            "Strong DAB can hide the haematoxylin signal of the same nucleus.",
            "Always state what the reference mask can and cannot see.",
        ),
        tags=("pathology", "immunohistochemistry", "nuclei", "counting"),
        closed=Closed(
            prompt="Which colour are the counterstained nuclei?",
            choices=("blue", "brown", "pink", "green"),
            answer="blue",
        ),
    ),
    "nm-uptake": Topic(
        anatomy="whole body",
        plane="coronal",
        vignette=(
            "Planar whole-body nuclear-medicine image (pydicom test file JPEG2000.dcm), shown as a tile. "
            "The tracer and the indication are not recorded in the sample file."
        ),
        findings=(
            "The body outline is faintly visible from background activity. Focal areas of high tracer "
            "uptake stand out above the background; they are outlined in the reference mask."
        ),
        discussion=(
            "Planar nuclear-medicine images show where a radiotracer accumulates, summed along the "
            "projection: depth is lost and resolution is low. Before calling a focus abnormal, match it "
            "with normal biodistribution: for example, renally excreted tracers collect in the kidneys "
            "and the urinary bladder, which is the commonest intense pelvic focus on a bone scan. "
            "The reference mask takes the top 1% of smoothed counts inside the body, so it marks the "
            "hottest foci whether physiological or not."
        ),
        key_points=(
            "Planar images sum activity through the body: depth and small lesions are lost.",
            "Know the tracer's normal biodistribution (e.g. bladder and kidneys for renally excreted tracers).",
            "Hot-spot thresholds mark intensity, not disease: interpretation is still needed.",
        ),
        tags=("nuclear medicine", "planar scintigraphy", "uptake", "whole body"),
        closed=Closed(
            prompt="An intense midline focus in the lower pelvis on a bone scan is most often…",
            choices=(
                "urinary bladder activity",
                "a bone metastasis",
                "a fracture",
                "an artefact of the camera",
            ),
            answer="urinary bladder activity",
            synonyms=("bladder", "urinary bladder"),
        ),
        open=Open(
            prompt="What information is lost in a planar image compared with SPECT?",
            answer="depth",
            synonyms=("depth information", "3d localisation", "three-dimensional location"),
        ),
    ),
    "nm-body": Topic(
        anatomy="whole body",
        plane="coronal",
        vignette=(
            "Planar whole-body nuclear-medicine image (pydicom test file JPEG2000.dcm), lower part of the "
            "body. Outline the body from its background activity."
        ),
        findings=(
            "The legs are visible as paired vertical bands of low, even activity above the background."
        ),
        discussion=(
            "In nuclear medicine the body outline comes from low-level soft-tissue activity and scatter, "
            "not from anatomy as in CT. Counts are low and noisy, so images are smoothed before "
            "thresholding; the reference mask thresholds smoothed counts at the 60th percentile and fills "
            "holes. A body mask is used to normalise counts and to restrict hot-spot searches."
        ),
        key_points=(
            "Planar NM images are count images: noisy and low resolution.",
            "Smooth before thresholding count data.",
            "A body mask limits quantification to the patient.",
        ),
        tags=("nuclear medicine", "planar scintigraphy", "body contour"),
        closed=Closed(
            prompt="What does the grey level of a nuclear-medicine image represent?",
            choices=(
                "detected radiotracer counts",
                "X-ray attenuation",
                "proton density",
                "sound reflection",
            ),
            answer="detected radiotracer counts",
            synonyms=("counts", "tracer counts", "radiotracer uptake"),
        ),
    ),
    "phase-cell": Topic(
        anatomy="cell",
        plane="en face",
        vignette=(
            "Quantitative phase microscopy image of a single cell (scikit-image sample 'cell', CC0). No "
            "stain was used."
        ),
        findings=("One round cell stands out from a flat background; its interior shows finer texture."),
        discussion=(
            "Phase imaging converts the optical path delay of light through a transparent, unstained cell "
            "into contrast; quantitative phase relates that delay to the cell's dry mass. Label-free "
            "segmentation of the cell outline lets its size and mass be followed over time without "
            "staining or phototoxicity. The reference mask thresholds a smoothed image (Otsu + 0.5 SD)."
        ),
        key_points=(
            "Phase contrast makes unstained, transparent cells visible.",
            "Quantitative phase is proportional to dry mass: label-free growth measurements.",
            "A single isolated object is the easiest segmentation case: expect a high Dice.",
        ),
        tags=("microscopy", "phase contrast", "label-free", "cell"),
        closed=Closed(
            prompt="Does phase microscopy need the cell to be stained?",
            choices=("no", "yes"),
            answer="no",
        ),
        open=Open(
            prompt="What physical property of the cell produces contrast in phase imaging?",
            answer="optical path difference",
            synonyms=("phase delay", "refractive index", "optical path length", "phase shift"),
        ),
    ),
}
