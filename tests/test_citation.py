"""CITATION.cff: valid CFF 1.2.0 metadata whose version is the package's, shipped in the sdist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import meanflow_losses as mfl

ROOT = Path(__file__).resolve().parents[1]
CFF = ROOT / "CITATION.cff"


def test_citation_metadata():
    yaml = pytest.importorskip("yaml")
    data = yaml.safe_load(CFF.read_text(encoding="utf-8"))
    assert data["cff-version"] == "1.2.0"
    assert data["type"] == "software"
    assert str(data["version"]) == mfl.__version__, "bump CITATION.cff's version with meanflow_losses.__version__"
    assert data["license"] == "MIT"
    assert data["repository-code"] == "https://github.com/meanflow-losses/meanflow_losses"
    assert data["authors"] and data["message"] and data["title"]
    ids = []
    for ref in data["references"]:
        assert ref["title"] and ref["authors"] and all("family-names" in a for a in ref["authors"]), ref
        arxiv = re.fullmatch(r"https://arxiv\.org/abs/(\d{4}\.\d{5})", ref["url"])
        assert arxiv, ref["url"]
        assert {"type": "doi", "value": f"10.48550/arXiv.{arxiv[1]}"} in ref["identifiers"], ref["title"]
        ids.append(arxiv[1])
    assert len(ids) == len(set(ids))


def test_citation_version_line_without_yaml():
    # the same pin without PyYAML (not a test dependency)
    versions = re.findall(r"^version:\s*\"?([^\s\"]+)\"?\s*$", CFF.read_text(encoding="utf-8"), flags=re.M)
    assert versions == [mfl.__version__]


def test_sdist_ships_citation_and_contributing():
    included = [
        name
        for line in (ROOT / "MANIFEST.in").read_text(encoding="utf-8").splitlines()
        if line.startswith("include ")
        for name in line.split()[1:]
    ]
    assert {"CITATION.cff", "CONTRIBUTING.md"} <= set(included)
    assert (ROOT / "CONTRIBUTING.md").is_file()
