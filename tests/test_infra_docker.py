"""``infra/docker/``: the Dockerfiles linted offline (no daemon, no registry here). They parse,
every COPY source exists in the build context and is not ignored, every package folder reaches
the image, the install step is the README's command, and the pins are installed in a layer that
only the pin file invalidates."""

import fnmatch
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "infra" / "docker"
KNOWN = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip
SOURCES = ["common", "model", "data", "orchestrator", "analysis"]  # pyproject's package folders


def parse(text: str) -> list[tuple[str, str, int]]:
    """(INSTRUCTION, arguments, line) with continuation lines joined and comments dropped."""
    out, buf, start = [], "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1].rstrip() + " "
            continue
        buf += line
        word, _, args = buf.partition(" ")
        out.append((word.upper(), args.strip(), start))
        buf = ""
    if buf:
        raise ValueError(f"line {start}: the file ends inside a continued instruction")
    return out


def ignored(rel: str) -> bool:
    patterns = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    parts = Path(rel).parts
    return any(
        fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(parts[0], p) or fnmatch.fnmatch(rel, p + "/*")
        for p in patterns
    )


def readme_install_command() -> str:
    readme = (ROOT / "README.md").read_text()
    commands = set(re.findall(r"^(bash scripts/install\.sh)\b", readme, re.M))
    assert len(commands) == 1, "the README's install command changed: update the images"
    return commands.pop()


FILES = sorted(DOCKER.glob("Dockerfile.*"))


def test_both_images_exist():
    assert {p.name for p in FILES} == {"Dockerfile.cpu", "Dockerfile.gpu"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_dockerfile_lints(path):
    steps = parse(path.read_text())
    words = [w for w, _, _ in steps]
    assert set(words) <= KNOWN, set(words) - KNOWN
    first = next(i for i, w in enumerate(words) if w != "ARG")
    assert words[first] == "FROM" and words.count("FROM") == 1
    declared = {a.split("=")[0] for w, a, _ in steps[:first] if w == "ARG"}
    used = set(re.findall(r"\$\{(\w+)\}", steps[first][1]))
    assert used <= declared, f"FROM uses undeclared {used - declared}"

    copied: list[str] = []
    for word, args, line in steps:
        if word == "ADD":
            pytest.fail(f"{path.name}:{line}: use COPY (ADD fetches URLs and unpacks archives)")
        if word != "COPY":
            continue
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        assert not args.startswith("--from"), "single-stage images: nothing to copy from"
        for src in parts[:-1]:
            rel = src.rstrip("/")
            assert (ROOT / rel).exists(), f"{path.name}:{line}: COPY source {src} does not exist"
            assert not ignored(rel), f"{path.name}:{line}: {src} is excluded by .dockerignore"
            copied.append(rel)
    for folder in SOURCES:
        assert folder in copied, f"{path.name}: the package folder {folder}/ is not copied"
    # everything the editable install and the deployment files read is in the image
    assert {"pyproject.toml", "README.md", "scripts", "constraints.txt", "infra"} <= set(copied)

    workdirs = [a for w, a, _ in steps if w == "WORKDIR"]
    assert workdirs == ["/opt/alcot"]  # infra/k8s refers to /opt/alcot/...
    runs = [(a, i) for i, (w, a, _) in enumerate(steps) if w == "RUN"]
    install = [i for a, i in runs if readme_install_command() in a]
    assert len(install) == 1, "exactly one RUN uses the README's install command"
    # cache: the pins are installed before any source is copied, from the pin file alone
    first_source = min(
        i
        for i, (w, a, _) in enumerate(steps)
        if w == "COPY" and a.split()[0].rstrip("/") in SOURCES
    )
    pins = [i for a, i in runs if "constraints" in a and "pip install" in a and i < first_source]
    assert pins, "no dependency layer before the sources are copied"
    copies_before = [a for w, a, _ in steps[: pins[0]] if w == "COPY"]
    assert copies_before == ["constraints.txt ./"]
    for a, _ in runs:
        if "apt-get install" in a:
            assert "apt-get update" in a and "--no-install-recommends" in a
            assert "rm -rf /var/lib/apt/lists" in a
    for word, args, line in steps:
        if word in ("ENV", "ARG"):
            for name in re.findall(r"(\w+)=", args):
                assert not re.search("PASSWORD|SECRET|TOKEN", name), f"{path.name}:{line}"


def test_cpu_image_takes_cpu_torch_and_gpu_image_keeps_the_base_torch():
    cpu = (DOCKER / "Dockerfile.cpu").read_text()
    assert "ARG ALCOT_TORCH_INDEX=https://download.pytorch.org/whl/cpu" in cpu
    assert "bookworm" in cpu  # Debian
    gpu = (DOCKER / "Dockerfile.gpu").read_text()
    assert re.search(r"^ARG NGC_IMAGE=nvcr\.io/nvidia/pytorch:\S+", gpu, re.M)
    assert "--system-site-packages" in gpu and "grep -vE '^torch=='" in gpu
    assert "ALCOT_CONSTRAINTS=constraints-gpu.txt bash scripts/install.sh" in gpu
    assert (
        "constraints=${ALCOT_CONSTRAINTS:-constraints.txt}"
        in (ROOT / "scripts/install.sh").read_text()
    )


def test_the_parser_reports_broken_files():
    with pytest.raises(ValueError, match="continued instruction"):
        parse("FROM x\nRUN a \\\n")
    steps = parse("ARG B=1\nFROM img:${B}\n# note\nRUN a \\\n  # inside\n  && b\n")
    assert steps == [("ARG", "B=1", 1), ("FROM", "img:${B}", 2), ("RUN", "a && b", 4)]
