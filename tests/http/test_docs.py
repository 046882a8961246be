"""/docs and /redoc work without network: every asset comes from this server."""

from __future__ import annotations

import re

import pytest

from tests.http.conftest import App


@pytest.mark.parametrize(
    ("page", "assets"),
    [
        ("/docs", ["swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"]),
        ("/redoc", ["redoc.standalone.js", "favicon.png"]),
    ],
)
def test_docs_pages_reference_no_outside_host(app: App, page: str, assets: list[str]) -> None:
    response = app.client.get(page)
    assert response.status_code == 200
    html = response.text
    assert not re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html), html
    for asset in assets:
        url = f"/docs/static/{asset}"
        assert url in html
        fetched = app.client.get(url)
        assert fetched.status_code == 200 and len(fetched.content) > 1000, url
    assert "/openapi.json" in html
