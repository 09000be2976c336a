"""User-facing text and limits of the portal, in one place (STYLE principle 11)."""

from __future__ import annotations

# ----------------------------------------------------------------------------------------------- limits
MAX_FILE_SIZE = "100mb"  # gradio launch(max_file_size=...): uploads above this get HTTP 413
QUEUE_MAX_SIZE = None  # the global queue is unbounded: cheap events (upload, slider, undo) are never refused
MODEL_QUEUE_MAX_SIZE = 80  # questions waiting for the model beyond this are refused (validator, before queueing)
MODEL_CONCURRENCY_ID = "model"  # every event that runs the model shares this queue
MODEL_CONCURRENCY_LIMIT = 1  # one generation at a time on one device
REMOTE_MODEL_CONCURRENCY_LIMIT = 16  # with a Ray Serve engine: requests in flight to its replicas
UI_CONCURRENCY_LIMIT = 4  # other events (reading uploads, redrawing overlays), per event
DELETE_CACHE = (600, 900)  # gradio cache sweep: every 10 min, files older than 15 min (uploads go at once)
SESSION_TTL_S = 1800  # an Ask session idle this long is dropped (gr.State time_to_live)
SESSION_MEMORY_BUDGET_MB = 2048  # all Ask sessions together; the least recently used give way beyond it
MAX_QUESTION_CHARS = 2000
MAX_NEW_TOKENS = 256  # answers in the portal; the engine's own cap is higher
REGION_TOKEN = "<region>"
SEG_FORCE_ANSWER = "<SEG>"

# ----------------------------------------------------------------------------------------------- banner
TITLE = "MedPLIB Portal"
NOT_FOR_CLINICAL_USE = (
    "**Research and teaching only — not for clinical use.** Answers and masks may be wrong; never use them "
    "for diagnosis or treatment. Do not upload images that identify a patient."
)
DEMO_MODEL_NOTICE = "Demonstration model — not MedPLIB's weights. Its answers show how the system works, not what MedPLIB would say."
MODEL_LINE = "Model **{name}** on **{device}** ({dtype}, {n_parameters:,} parameters, {n_experts} experts per MoE layer)"

# ------------------------------------------------------------------------------------------------ ask tab
ASK_TAB = "Ask"
UPLOAD_LABEL = "Image: PNG, JPEG, TIFF, BMP, DICOM (any name) or NIfTI (.nii, .nii.gz)"
PREVIEW_LABEL = "Image (click to mark a point or a box)"
SKETCH_LABEL = "Sketch a region with the brush"
MODEL_INPUT_LABEL = "What the model sees (336×336 CLIP input, padded)"
SHOW_MODEL_INPUT = "Show the exact model input"
FRAME_LABEL = "Frame"
PLANE_LABEL = "Plane"
SLICE_LABEL = "Slice"
WINDOW_LABEL = "Display window (CT presets: width / level in HU)"
TOOL_LABEL = "Region tool"
TOOLS = ("None", "Point", "Box", "Sketch")
ONE_REGION_NOTE = (
    "MedPLIB takes **one region per question**: a new mark replaces the previous one (Undo brings it back). "
    "A box needs two clicks (opposite corners). The model works on one 2-D slice at a time."
)
QUESTION_LABEL = "Question"
QUESTION_PLACEHOLDER = "Ask about the image, e.g. 'Describe the image' or 'Please segment the liver.'"
TASK_CHIPS = (
    "Describe the image.",
    "Please segment the {organ} in this image.",
    "What is in the marked region? <region>",
)
CHIP_ORGAN = "lesion"
ASK_BUTTON = "Ask"
SEGMENT_BUTTON = "Segment"
SEGMENT_HELP = (
    "**Segment** makes the model answer with `<SEG>`, so a mask is always decoded. "
    "With an empty question box it asks your last question again, this time for a mask; with a marked region "
    "and an empty box it asks for the structure under the region (and says so when there is none)."
)
UNDO_BUTTON = "Undo mark"
CLEAR_BUTTON = "Clear marks"
NEW_CHAT_BUTTON = "New conversation"
CHAT_LABEL = "Conversation (the image is encoded once and reused for follow-up questions)"
CHAT_NO_TEXT = "*(no text)*"
CHAT_MASK_ONLY = "*(answered with `<SEG>` only: a mask of {pixels:,} px, shown in the mask overlay)*"
CHAT_EMPTY_MASK = "*(answered with `<SEG>`, but the mask is empty: no pixel above the threshold)*"
CHAT_UNFINISHED = (
    "*(the model gave no complete sentence: this small demo model only knows the bundled images; "
    "try another question)*"
)
OVERLAY_LABEL = "Mask overlay"
OPACITY_LABEL = "Opacity"
STYLE_LABEL = "Mask style"
MASK_STYLES = ("fill", "outline", "fill + outline")
COLOR_LABEL = "Mask colour"
MASK_COLORS = {  # Okabe-Ito colour-blind-safe palette
    "orange": (230, 159, 0),
    "sky blue": (86, 180, 233),
    "bluish green": (0, 158, 115),
    "yellow": (240, 228, 66),
    "vermillion": (213, 94, 0),
    "reddish purple": (204, 121, 167),
}
MARK_COLOR = (0, 114, 178)  # Okabe-Ito blue for point / box markers
DOWNLOADS_LABEL = "Downloads: mask PNG, mask NIfTI, JSON record"
NO_MASK_NOTICE = "No `<SEG>` token in the answer → no mask. Press **Segment** to ask for one."
MASK_AREA = "Mask area: **{area}**"
MASK_AREA_MM = "Mask area: **{area} ≈ {mm2:,.1f} mm²** (pixel spacing {row:.3g} × {col:.3g} mm)"
EMPTY_MASK_NOTICE = "The model produced `<SEG>` but the mask is empty (no pixel above the threshold)."
ROUTING_TITLE = "Mixture-of-experts routing"
ROUTING_EXPLANATION = (
    "Each MoE layer sends every generated token to one of its experts (top-1 routing).\n"
    "Rows are layers, columns are answer tokens; the colour is the expert that handled the token."
)
EXAMPLES_LABEL = "Examples (bundled, de-identified public images)"

# ---------------------------------------------------------------------------------------------- errors
ERR_NO_IMAGE = (
    "Upload an image first (or pick an example). An image left idle for a long time is released: upload it again."
)
ERR_MODEL_QUEUE_FULL = "The model is busy: {n} questions are waiting. Please ask again in a minute."
ERR_EMPTY_QUESTION = "Type a question first, or click one of the task chips."
ERR_LONG_QUESTION = "The question is too long ({n} characters); keep it under {limit}."
ERR_OUTSIDE = "The click at ({x}, {y}) is outside the {w}×{h} image. Click on the image itself."
ERR_EMPTY_SKETCH = "The sketch is empty. Draw over the region with the brush, or choose another region tool."
ERR_NO_MARK = (
    "The {tool} tool is selected but nothing is marked. Click on the image, or set the tool to None."
)
ERR_HALF_BOX = "The box has only one corner. Click the opposite corner, or press Undo."
ERR_SKETCH_SIZE = "The sketch does not match the image size; clear it and draw again."
ERR_SCRIPT_TOOL = "/mark_region takes tool 'Point' (x1, y1) or 'Box' (x1, y1, x2, y2), in image pixels."
ERR_MODEL = "The model failed on this request ({kind}). Try again; if it keeps failing, try a smaller image."
ERR_REGION_TAG = (
    "The question contains <region> but no region is marked. Mark a point, box or sketch, or remove <region>."
)
ERR_NO_ANSWER = "There is no answer to save yet."
ERR_SERVER = "Something went wrong on the server ({kind}); nothing was changed. Try again in a moment."
SERVER_FAULT_TITLE = "Server error"
ERR_UPLOAD_GONE = (
    "The uploaded file is no longer on the server (uploads are kept only while you work on them): upload it again."
)
NOTE_NO_MARK = "No region marked."
NOTE_ACTIVE_MARK = "Active region: {kind} at {where}"
NOTE_ACTIVE_SKETCH = (
    "Active region: sketch ({pixels:,} brush pixels). With the Sketch tool only the brush strokes are sent; "
    "clicked points and boxes are not."
)
NOTE_EMPTY_SKETCH = (
    "Sketch tool: draw over the region with the brush. With the Sketch tool only the brush strokes are "
    "sent; clicked points and boxes are not."
)
NOTE_TOOL_NONE = "Region tool None: questions are sent without a region."
NOTE_MARK_KEPT = " The {kind} at {where} is kept: choose Point or Box to send it again."
NOTE_PICK_TOOL = "Choose the Point or Box tool to mark a region (now: {tool})."
NOTE_FIRST_CORNER = "First corner set at ({x}, {y}); click the opposite corner."

# --- instructor sign-in (portal/instructor_auth.py) -------------------------------------------------
LOGIN_WRONG = "Wrong instructor username or password."
LOGIN_THROTTLED = "Too many failed logins: try again in {seconds} s."
LOGIN_BAD_REQUEST = "Send the username and password as JSON."
HF_SIGN_IN_NOTE = "Or sign in with your Hugging Face account (instructors on this Space's allow-list)."


# ------------------------------------------------------------------ issue 21: volumes, DICOM SEG, classes
EXTRAS_TITLE = "Whole volume · DICOM SEG · save as a case draft"
SEG_BUTTON = "Download the mask as DICOM SEG"
SEG_FILES_LABEL = "DICOM SEG (and, for a non-DICOM image, the Secondary Capture it references)"
SEG_NO_MASK = "There is no mask to export yet: press Segment first."
VOLUME_BUTTON = "Segment the whole volume"
VOLUME_CANCEL = "Cancel"
VOLUME_NEEDS_VOLUME = "Whole-volume segmentation needs a NIfTI volume or a multi-frame DICOM file with several slices."
VOLUME_NEEDS_QUESTION = "Type what to segment (e.g. 'Please segment the brain in this image.'), or ask once first."
VOLUME_PROGRESS = "Segmenting {plane} slice {done} of {total}…"
VOLUME_DONE = (
    "**{label}**: {voxels:,} voxels on {with_mask} of {n} slices · **{volume}** · {per_slice:.2f} s per slice"
    " (shape {shape})"
)
VOLUME_FILES_LABEL = "3-D mask on the source grid (NIfTI; DICOM SEG, for NIfTI zipped with its Secondary Captures)"
VOLUME_SEG_ZIP = "volume-seg-dicom.zip"  # a NIfTI volume's SEG and the Secondary Capture series it references
VOLUME_UNKNOWN_ML = "volume unknown (no voxel size)"
VOLUME_CACHE_ENTRIES = 256  # slice embeddings kept per browser for a second question on the same volume
DRAFT_TITLE_LABEL = "Case title (instructor)"
DRAFT_BUTTON = "Save as a case draft"
DRAFT_NEEDS_LOGIN = "Saving a case draft is an instructor action: log in on the Instructor tab first."
DRAFT_NEEDS_ANSWER = "Ask a question first: the draft keeps the image, region, question, answer and mask."
DRAFT_SAVED = "Saved unpublished draft **#{id}** ({slug}); finish and publish it in the Instructor tab."
DRAFT_LICENCE = "unspecified: set the licence before publishing"
NIFTI_4D_NOTE = "**4-D NIfTI: only the first of its {n} volumes is shown and used.**"
RGBA_NOTE = "**Transparent pixels ({share:.0%} of the image) are shown black**, as the model sees them."
MIN_IMAGE_SIDE = 16  # pixels: smaller images give an unusable preview and model input
MAX_ASPECT_RATIO = 8.0  # longest / shortest side: the 336×336 model input would be mostly padding
ERR_IMAGE_TOO_SMALL = "The image is {w}×{h} pixels; it must be at least {side}×{side}. Upload a larger image."
ERR_IMAGE_ASPECT = (
    "The image is {w}×{h} pixels (ratio {ratio:.0f}:1); the model input would be mostly padding. Crop it to a "
    "ratio under {limit:.0f}:1."
)
CLASS_TAB = "Class sessions"


def count_noun(n: int, singular: str, plural: str | None = None) -> str:
    """'1 pixel', '2 pixels', '1,024 cases': a count with the right form of its noun."""
    return f"{n:,} {singular if n == 1 else (plural or singular + 's')}"
