"""Data: readers of the users' formats, images, the BPE tokenizer and chat template, datasets,
collate and packing, the synthetic demo scenes."""
