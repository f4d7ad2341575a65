"""Every YAML example in README.md and docs/ is valid: each is extracted and checked as `rackboot check-config` does.

A block that is a whole config (it has `interface:`) is checked with the README's inventory beside it; an
inventory (`nodes:`) with the README's config; a fragment of the config (e.g. a `deploy:` section) merged
into the README's config; an environment description (`image:`) as `rackboot env add` reads it; an experiment file (`name:` and
node counts) as `rackboot experiment run` reads it. Files the examples name (BMC credentials) are made with placeholder contents.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from appliance.catalog import parse_environment_file
from appliance.cli import main
from appliance.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.M | re.S)
CONFIG_SECTIONS = ("dhcp", "tftp", "http", "dns", "boot", "deploy", "log")


def yaml_blocks() -> list[tuple[str, str]]:
    """(where, text) of every ```yaml block of the docs."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for m in BLOCK.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            out.append((f"{doc.relative_to(ROOT)}:{line}", m.group(1)))
    return out


def readme_pair() -> tuple[str, str]:
    """The README's config and inventory examples."""
    config = inventory = ""
    for where, text in yaml_blocks():
        if where.startswith("README.md"):
            data = yaml.safe_load(text)
            if "interface" in data:
                config = text
            elif "nodes" in data:
                inventory = text
    assert config and inventory, "the README shows a config and an inventory"
    return config, inventory


def write_case(tmp_path: Path, config: str, inventory: str) -> Path:
    """Write a config and its inventory (and the credentials files the inventory names) under tmp_path."""
    data = yaml.safe_load(config)
    data["state_dir"] = str(tmp_path / "state")
    data["inventory"] = "nodes.yaml"
    (tmp_path / "rackboot.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "nodes.yaml").write_text(inventory)
    for name in re.findall(r"credentials:\s*([\w./-]+)", inventory):
        (tmp_path / name).write_text("username: admin\npassword: example\n")
    return tmp_path / "rackboot.yaml"


@pytest.mark.parametrize("where,text", yaml_blocks(), ids=[w for w, _ in yaml_blocks()])
def test_every_yaml_example_is_a_valid_config(where: str, text: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    data = yaml.safe_load(text)
    assert isinstance(data, dict), f"{where}: not a mapping"
    if "image" in data:  # an environment description, its image file made beside it
        image = data["image"].get("file") if isinstance(data["image"], dict) else None
        if image:
            (tmp_path / image).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / image).write_bytes(b"image")
        (tmp_path / "env.yaml").write_text(text)
        parse_environment_file(tmp_path / "env.yaml", "admin", image_roots=[tmp_path])  # raises ConfigError
        return
    nodes = data.get("nodes")
    if "name" in data and (isinstance(nodes, int) or isinstance(nodes, list) and all(isinstance(n, int) for n in nodes)):
        from vmtestbed.experiment import load_experiment  # an experiment file (docs/scale.md)

        (tmp_path / "experiment.yaml").write_text(text)
        load_experiment(tmp_path / "experiment.yaml")  # raises ExperimentError naming the key
        return
    config, inventory = readme_pair()
    if "interface" in data:
        config = text
    elif "nodes" in data:
        inventory = text
    else:
        assert set(data) <= set(CONFIG_SECTIONS), f"{where}: neither a config, an inventory nor a config section"
        merged = yaml.safe_load(config)
        merged.update(data)
        config = yaml.safe_dump(merged)
    path = write_case(tmp_path, config, inventory)
    load_config(path)  # raises ConfigError with FILE:LINE problems
    assert main(["check-config", "--config", str(path)]) == 0, capsys.readouterr().err
