"""Why a compiled MAC decode with CUDA graphs leaves tensors in the graph pool (BENCHMARKS.md
15d, 16): test_gpu_mac's CUDA-graph test with Inductor's allocation-history recording on, so the
"not tracked as outputs" error names where each leaked block was allocated; then with the side
stream off (MACOPT_SIDE_STREAM=0, a fresh process) to tell the stream's part apart.

    python3 examples/research/cudagraph_pool_debug.py   (from /tmp; gpu_session.sh pool-debug)
"""

import os
import subprocess
import sys
from pathlib import Path

TEST = (Path(__file__).resolve().parents[2] / "tests" / "test_gpu_mac.py").as_posix() + \
    "::test_decode_compiled_with_cuda_graphs_equals_the_eager_route"

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        import pytest
        import torch._inductor.config as inductor_config

        inductor_config.triton.cudagraph_trees_history_recording = True
        sys.exit(pytest.main(["-p", "no:cacheprovider", "-p", "no:logging", "-o", "addopts=",
                              "-q", "-x", "--tb=long", f"{TEST}[1.0]"]))
    for side in ("1", "0"):
        print(f"=== MACOPT_SIDE_STREAM={side}", flush=True)
        env = dict(os.environ, MACOPT_SIDE_STREAM=side)
        subprocess.run([sys.executable, __file__, "run"], env=env, check=False)
