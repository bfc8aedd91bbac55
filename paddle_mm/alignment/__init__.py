"""Modality alignment before a language model reads the images (the `align` and `clip` stages).

`align` is BLIP-2's first stage (a Q-Former trained with ITC, ITM and ITG on image-caption
pairs); `clip` trains an image tower and a text tower contrastively. Both run in the one
training loop (paddle_mm/training/loop.py) through their objectives (training/objectives.py),
which build the model and the dataset with alignment/stages.py.
"""
