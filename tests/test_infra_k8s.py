"""``infra/k8s/``: the RayCluster and RayJob validate against the KubeRay CRD schemas (strictly:
an unknown field is an error, as with ``kubectl apply --validate=strict``), the RayJob's
entrypoint is a command the CLI accepts, its lifecycle settings are set, and no manifest holds
a secret inline. No Kubernetes cluster is started: there is none here."""

import copy
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay"
SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN", "KEY")


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def all_documents() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in sorted(K8S.glob("*.yaml")) for d in documents(p.name)]


def strict(schema):
    """The CRD's structural schema as JSON schema that refuses unknown fields (Kubernetes
    prunes them silently, which hides typos such as ``shutdownAfterJobFinish``)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def validators():
    if not SCHEMAS.is_dir():
        pytest.skip(
            f"the KubeRay CRD schemas are not here ({SCHEMAS}): they come with the project's "
            "shared folder beside the checkout, as in CI"
        )
    import jsonschema

    out = {}
    for kind, name in (("RayCluster", "rayclusters"), ("RayJob", "rayjobs")):
        crd = yaml.safe_load((SCHEMAS / f"ray.io_{name}.yaml").read_text())
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schema = strict(version["schema"]["openAPIV3Schema"])
        out[kind] = jsonschema.Draft7Validator(schema)
    return out


def errors(validator, doc) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def test_ray_manifests_match_the_kuberay_crds(validators):
    seen = set()
    for name, doc in all_documents():
        if doc.get("apiVersion") != "ray.io/v1":
            continue
        seen.add(doc["kind"])
        assert errors(validators[doc["kind"]], doc) == [], name
    assert seen == {"RayCluster", "RayJob"}


def test_the_validation_catches_typos_and_wrong_types(validators):
    (job,) = documents("rayjob.yaml")
    typo = copy.deepcopy(job)
    typo["spec"]["shutdownAfterJobFinish"] = typo["spec"].pop("shutdownAfterJobFinishes")
    assert any("shutdownAfterJobFinish" in e for e in errors(validators["RayJob"], typo))
    wrong = copy.deepcopy(job)
    wrong["spec"]["ttlSecondsAfterFinished"] = "10 minutes"
    assert any("ttlSecondsAfterFinished" in e for e in errors(validators["RayJob"], wrong))
    (cluster,) = documents("raycluster.yaml")
    bad = copy.deepcopy(cluster)
    del bad["spec"]["workerGroupSpecs"][0]["groupName"]
    assert any("groupName" in e for e in errors(validators["RayCluster"], bad))
    bad = copy.deepcopy(cluster)
    bad["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imag"] = "x"
    assert errors(validators["RayCluster"], bad)


def test_the_rayjob_cleans_up_and_gives_up():
    (job,) = documents("rayjob.yaml")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert 0 < spec["ttlSecondsAfterFinished"] <= 3600
    assert spec["activeDeadlineSeconds"] > spec["ttlSecondsAfterFinished"]
    assert spec["backoffLimit"] >= 1
    assert spec["submitterConfig"]["backoffLimit"] >= 1
    text = (K8S / "rayjob.yaml").read_text()
    for field in ("shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "activeDeadlineSeconds"):
        assert f"# * {field}" in text  # each one is explained where it is set
    assert "# * backoffLimit" in text


def test_the_rayjob_entrypoint_is_a_command_the_cli_accepts(tmp_path, monkeypatch, capsys):
    from alcot.orchestrator.cli import main

    (job,) = documents("rayjob.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["alcot", "sweep", "run"]
    assert argv[argv.index("--address") + 1] == "auto"  # the cluster the job runs on
    # the image keeps the checkout at /opt/alcot (infra/docker); here it is ROOT
    args = [a.replace("/opt/alcot/", f"{ROOT}/") for a in argv[1:]]
    i = args.index("--address")
    del args[i : i + 2]
    monkeypatch.setenv("ALCOT_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main([*args, "--dry-run"]) == 0
    assert "trials" in capsys.readouterr().out
    assert not (tmp_path / "mlflow.db").exists()  # a dry run creates nothing


def env_entries(node) -> list[dict]:
    """Every ``{name, value | valueFrom}`` mapping (container env entries) under ``node``."""
    if isinstance(node, dict):
        own = [node] if "name" in node and ("value" in node or "valueFrom" in node) else []
        return own + [e for v in node.values() for e in env_entries(v)]
    if isinstance(node, list):
        return [e for v in node for e in env_entries(v)]
    return []


def test_secrets_are_referenced_never_inline():
    kinds = set()
    for name, doc in all_documents():
        kinds.add(doc.get("kind"))
        assert doc.get("kind") != "Secret", f"{name}: a Secret belongs in the cluster, not here"
        for env in env_entries(doc):
            if any(w in env["name"].upper() for w in SECRET_WORDS):
                assert "secretKeyRef" in env.get("valueFrom", {}), f"{name}: {env['name']}"
            value = str(env.get("value", ""))
            if "://" in value and "@" in value:  # credentials inside a URI come from a secret
                assert "$(" in value.split("@")[0], f"{name}: {env['name']} = {value}"
    assert {"Deployment", "StatefulSet", "RayCluster", "RayJob"} <= kinds
