"""Taking a model out: ONNX export, the onnxruntime model (no torch), the Flask app and its server, the
wheelhouse for Kaggle without Internet. Nothing here is imported by this package: the serving path
must stay free of torch, so import the module you need (``xrai.deploy.app``, ``xrai.deploy.export``)."""
