"""docs/api.md is the served API: its endpoint, query-parameter and object tables equal what the
app's OpenAPI document says (both ways), every error code the service raises is listed, and so is
every code a failed job can carry. The README links the docs and points at nothing outside the
repository."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
API_MD = (REPO / "docs" / "api.md").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    from test_api import Harness

    harness = Harness(tmp_path_factory.mktemp("docs"))
    try:
        return harness.client.get("/v1/openapi.json").json()
    finally:
        harness.store.close()


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", API_MD, re.M | re.S)
    assert match, f"docs/api.md has no '## {title}' section"
    return match.group(1)


def test_every_served_endpoint_is_documented_and_nothing_else(spec):
    served = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    documented = set(re.findall(r"^\| (GET|POST|PATCH|DELETE|PUT) \| (/\S+) \|", _section("Endpoints"), re.M))
    assert documented == served, {"undocumented": served - documented, "not served": documented - served}


def test_query_parameters_match(spec):
    served = {(f"{method.upper()} {path}", p["name"]) for path, ops in spec["paths"].items()
              for method, op in ops.items() for p in op.get("parameters", []) if p["in"] == "query"}
    documented = set(re.findall(r"^\| ((?:GET|POST|PATCH|DELETE) /\S+) \| `(\w+)` \|", _section("Query parameters"), re.M))
    assert documented == served, {"undocumented": served - documented, "not served": documented - served}


def test_object_fields_match_the_schemas(spec):
    tables = re.findall(r"<!-- schema: (\w+) -->\n((?:\|.*\n)+)", API_MD)
    assert len(tables) >= 15
    schemas = spec["components"]["schemas"]
    for name, table in tables:
        documented = re.findall(r"^\| `(\w+)` \|", table, re.M)
        assert len(documented) == len(set(documented)), f"{name}: a field is listed twice"
        assert set(documented) == set(schemas[name]["properties"]), name
    for must in ("Avatar", "Account", "ErrorBody", "GenerateRequest", "CastRequest", "WebhookEndpoint"):
        assert must in dict(tables), f"docs/api.md documents no {must}"


def test_every_error_code_the_service_raises_is_documented():
    source = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "serve").rglob("*.py"))
    raised = set(re.findall(r'ApiError\(\s*\d{3},\s*"(\w+)"', source))
    raised |= set(re.findall(r'error_(?:body|response)\([^"\n]*"(\w+)"', source))
    raised |= set(re.findall(r'^\s+code = "(\w+)"', (REPO / "serve" / "store" / "records.py").read_text(), re.M)) - {
        "store_error", "not_found", "account_not_found"}
    documented = set(re.findall(r"^\| (\w+) \| \d{3} \|", _section("Errors"), re.M))
    assert raised and raised <= documented, raised - documented


#: Calls that fail a job, and which positional argument is its error code (a `code=` keyword
#: counts anywhere): the worker's `Outcomes.fail`, the store's `fail_job`, `JobBuildError`.
_JOB_FAILING_CALLS = {"fail": 1, "fail_job": 2, "JobBuildError": 0}


def _job_code_literals() -> list[str]:
    """Job failure codes written as string literals at a raising site in serve/ (each must come
    from `vocab.JobErrorCode`, the one table the docs are checked against)."""
    found = []
    for path in (REPO / "serve").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            args = [kw.value for kw in node.keywords if kw.arg == "code"]
            if name in _JOB_FAILING_CALLS and len(node.args) > _JOB_FAILING_CALLS[name]:
                args.append(node.args[_JOB_FAILING_CALLS[name]])
            found += [f"{path.relative_to(REPO)}:{node.lineno} {a.value!r}" for a in args
                      if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return found


def _engine_error_codes() -> set[str]:
    """The `code` class attribute of every engine error class (a job the engine refuses fails with it)."""
    codes = set()
    for path in (REPO / "avatar_engine").rglob("*.py"):
        for cls in (n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, ast.ClassDef)):
            for stmt in cls.body:
                if isinstance(stmt, ast.Assign) and [getattr(t, "id", None) for t in stmt.targets] == ["code"] \
                        and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
                    codes.add(stmt.value.value)
    return codes


def test_every_job_failure_code_is_documented():
    from serve.vocab import JobErrorCode

    assert _job_code_literals() == [], "fail jobs with a JobErrorCode member, not a string literal"
    engine = _engine_error_codes()
    assert {"engine_error", "invalid_request", "model_unavailable"} <= engine
    raised = {c.value for c in JobErrorCode} | engine
    assert {"generation_failed", "asset_missing", "unsupported_kind", "invalid_job"} <= raised
    documented = set(re.findall(r"^\| (\w+) \| ", _section("Job failure codes"), re.M)) - {"Code"}
    assert raised == documented, {"undocumented": raised - documented, "not raised": documented - raised}


def test_readme_links_the_docs_and_nothing_outside_the_repository():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+)[^)]*\)", readme)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert "docs/api.md" in local and "docs/architecture.md" in local
    for link in local:
        assert (REPO / link).resolve().is_relative_to(REPO) and (REPO / link).exists(), link
    assert "API.md" not in re.sub(r"docs/api\.md", "", readme), "README cites an API.md outside the repository"
