"""docs/api.md is the served API: its endpoint, query-parameter and object tables equal what the
app's OpenAPI document says (both ways), and every error code the service raises is listed.
The README links the docs and points at nothing outside the repository."""
from __future__ import annotations

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


def test_readme_links_the_docs_and_nothing_outside_the_repository():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+)[^)]*\)", readme)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert "docs/api.md" in local and "docs/architecture.md" in local
    for link in local:
        assert (REPO / link).resolve().is_relative_to(REPO) and (REPO / link).exists(), link
    assert "API.md" not in re.sub(r"docs/api\.md", "", readme), "README cites an API.md outside the repository"
