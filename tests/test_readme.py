"""The README's examples run as written."""

import os
import re


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_block(section: str) -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert blocks, f"README section {section!r} has no python example"
    return blocks[0]


def test_deploy_example_runs(capsys):
    code = _python_block("Deploy")
    namespace: dict = {}
    exec(compile(code, "README.md#deploy", "exec"), namespace)
    logits, stats, engine = namespace["logits"], namespace["stats"], namespace["engine"]
    assert logits.shape == (8, 10)
    assert stats["macs"].shape == (8,) and (stats["macs"] < engine.dense_macs).all()
    assert stats["active"].shape == (8, engine.num_gates)


def test_readme_commands_exist():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    assert "./dev.sh bench" in text and "./dev.sh test" in text
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert "./dev.sh test" in f.read()
    for flag in ("--arch", "--dataset", "--pretrain_path", "--target_remain_rate", "--lambda_lasso",
                 "--lambda_graph", "--data_path", "--ngpu"):
        assert flag in text
