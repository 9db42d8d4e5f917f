"""Training data.

* ``corpora`` — the corpora a run can train on and their configuration, checked without reading them
* ``loading`` — documents -> tokenizer -> fixed-length sequences, and the held-out validation split
* ``stories`` — the embedded synthetic corpus (a seeded grammar of children's stories)
* ``debian`` — two real-text corpora Debian packages install: fortunes and the Python documentation
"""
