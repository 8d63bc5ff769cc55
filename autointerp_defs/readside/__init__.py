"""The read side: the latent browser (`app.py` its answers, `server.py` its HTTP, `static/` its pages),
the cached per-coder indexes it and the exports share (`index.py`), the exports to Neuronpedia and
delphi and the import of delphi's explanations (`neuronpedia.py`, `delphi.py`); all of them read the
data root through `reader.py`, and its tables through the pipeline's `TableStore`. Here, on the top
floor, because reading the tables needs the scorers and coders below it."""
