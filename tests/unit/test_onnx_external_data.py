"""An ONNX artifact whose weights point at data outside its own folder is refused before ONNX
Runtime opens it: a `location` climbing out with `..`, an absolute one, or a side file inside the
folder that is a symlink to somewhere else. External data inside the folder loads and computes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from app.artifacts import ArtifactError, refuse_outside_external_data
from app.inference import _ort_session


def _model_reading(folder, location: str):
    """y = x + w, with w (4 floats) stored as external data at `location` relative to the model."""
    w = TensorProto()
    w.name, w.data_type = "w", TensorProto.FLOAT
    w.dims.extend([4])
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "secret.bin"
    np.array([7, 7, 7, 7], dtype=np.float32).tofile(path)
    return path


@pytest.mark.parametrize("location", ["../secret.bin", "sub/../../secret.bin", "ABSOLUTE"])
def test_a_location_outside_the_folder_is_refused(tmp_path, secret, location):
    location = str(secret) if location == "ABSOLUTE" else location
    path = _model_reading(tmp_path / "artifact", location)
    with pytest.raises(ArtifactError, match=r"refused: tensor 'w' reads external data from .*secret\.bin.*outside the artifact folder"):
        _ort_session(str(path))  # the loader every ONNX predictor goes through


def test_a_side_file_symlinked_out_of_the_folder_is_refused(tmp_path, secret):
    path = _model_reading(tmp_path / "artifact", "weights.bin")
    (tmp_path / "artifact" / "weights.bin").symlink_to(secret)
    with pytest.raises(ArtifactError, match="'weights.bin', outside the artifact folder"):
        refuse_outside_external_data(path)


def test_external_data_inside_the_folder_loads_and_computes(tmp_path):
    path = _model_reading(tmp_path / "artifact", "weights.bin")
    np.array([1, 2, 3, 4], dtype=np.float32).tofile(tmp_path / "artifact" / "weights.bin")
    refuse_outside_external_data(path)
    y = _ort_session(str(path)).run(None, {"x": np.full(4, 10, dtype=np.float32)})[0]
    assert y.tolist() == [11, 12, 13, 14]
