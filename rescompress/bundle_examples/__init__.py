"""Templates of the `predict.py` example each bundle ships (see `rescompress.bundle`).

`common.py` holds what every runtime shares: reading preprocess.json and labels.txt, turning an image file
into the model's input exactly as rescompress's evaluation transform does, quantizing an int8 input, and
printing the top classes. `predict_<runtime>.py` adds `open_model(pre)` for one runtime. A bundle's
`predict.py` is the two joined, so it runs with numpy, Pillow and that runtime only.
"""
