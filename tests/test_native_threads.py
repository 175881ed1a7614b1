"""The stage's thread count reaches the models' own thread pools (issue 20 item 3): BLAS and
OpenMP (threadpoolctl) after the pipeline is built, and ONNX Runtime's intra-op pool
(SessionOptions) when a model loads. Run in a subprocess: thread limits are per process."""

import json
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np, torch
    sys.path.insert(0, "tests")
    from threadpoolctl import threadpool_info
    from usermodels import cheap_pipeline, tabular_model
    from riskpipe.models import load_model

    tmp = Path(sys.argv[1])
    before = sorted({p["num_threads"] for p in threadpool_info()})
    torch.set_num_threads(int(sys.argv[2]))
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    torch.onnx.export(net, torch.zeros(1, 4), str(tmp / "m.onnx"), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    onnx_threads = load_model(str(tmp / "m.onnx") + "?shape=4").meta["onnx_threads"]
    pipe = cheap_pipeline(tmp, "wine", tabular_model(tmp))  # torch_threads: 1 (the default)
    after = {p["internal_api"]: p["num_threads"] for p in threadpool_info()}
    print(json.dumps({"before": before, "after": after, "onnx_threads": onnx_threads}))
""")


def _probe(tmp_path, torch_threads):
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path), str(torch_threads)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_blas_openmp_and_onnx_runtime_follow_the_stage_thread_count(tmp_path):
    seen = _probe(tmp_path, 1)
    assert seen["after"] and set(seen["after"].values()) == {1}, seen  # every loaded pool capped at torch_threads
    assert seen["onnx_threads"] == 1
    assert _probe(tmp_path, 2)["onnx_threads"] == 2  # follows the count, not a constant
