"""Everything that takes a net out of caffeport: ONNX, PyTorch files, pictures.

``onnx`` (NetParameter -> ONNX graph, checked against caffeport's forward), ``torch_export``
(state_dict / TorchScript / torch.export files), ``draw`` (Graphviz DOT and pictures).
"""
