"""The dashboard page's own references resolve: every script and stylesheet URL that `GET /ui`
writes into the page answers 200 through the API's strict query-parameter checks.

The unknown-query-parameter rule (issue 11) once refused the page's `plotly.min.js?v=<version>`
with 422, so the dashboard drew no charts; the browser tests saw it only as a chart timeout.
"""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

ASSET_URL = re.compile(r'(?:src|href)="([^"]*/ui/assets/[^"]*)"')


def test_every_asset_the_page_names_loads(client: TestClient) -> None:
    page = client.get("/ui")
    assert page.status_code == 200
    urls = ASSET_URL.findall(page.text)
    assert any("plotly.min.js?v=" in url for url in urls), urls
    assert {"dashboard.js", "dashboard.css"} <= {url.rsplit("/", 1)[-1] for url in urls}
    for url in urls:
        answer = client.get(url)
        assert answer.status_code == 200, (url, answer.text[:200])
        assert answer.content


def test_an_asset_query_is_still_bounded(client: TestClient) -> None:
    answer = client.get("/ui/assets/plotly.min.js", params={"v": "x" * 65})
    assert answer.status_code == 422 and answer.json()["error"]["param"] == "v"
    assert client.get("/ui/assets/plotly.min.js", params={"w": "1"}).status_code == 422
