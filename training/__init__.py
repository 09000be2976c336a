"""Training data: real medical images bundled in pip packages (`sources`) and a MeCoVQA-format corpus (`corpus`).

`python -m training.sources --out assets/medimages` writes the image/mask folder and its `index.json`;
`python -m training.corpus --assets assets/medimages --out <dir>` writes the MeCoVQA-style JSON files.
"""
