"""The dashboard (`GET /ui`) in a real headless Chromium against the real running service.

The page follows a job live from queued to succeeded without a reload, then shows its loss curve
(the API's values), the other training and eval charts, events, checkpoints and a working adapter
download, with no console error and no request leaving the service's origin (plotly.js comes
from the service, not a CDN). Set OPSD_DASHBOARD_SCREENSHOT=PATH to also save the screenshot
there (docs/dashboard.png was made that way).
"""

from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import httpx

from tests.opsd_client.service import LiveService, tiny_body

LIVE_JOB_STEPS = 10
SCREENSHOT_ENV = "OPSD_DASHBOARD_SCREENSHOT"
RECORD_STATUSES = """
window.__statuses = [];
window.__job = null;
new MutationObserver(() => {
  // only the followed job's statuses: a late render of the job shown before counts for nothing
  const shown = document.getElementById('job-id');
  if (!window.__job || !shown || shown.textContent !== window.__job) return;
  const node = document.getElementById('job-status');
  const text = node && node.textContent;
  if (text && window.__statuses[window.__statuses.length - 1] !== text) {
    window.__statuses.push(text);
  }
}).observe(document, { subtree: true, childList: true, characterData: true });
"""


@dataclass
class Watch:
    """What a page did: console errors, uncaught exceptions, every request URL."""

    origin: str
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def attach(self, page: Any) -> None:
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        page.on("request", lambda r: self.requests.append(r.url))

    def foreign_requests(self) -> list[str]:
        allowed = (self.origin + "/", "data:", "blob:" + self.origin)
        return [url for url in self.requests if not url.startswith(allowed)]


def _open(browser: Any, service: LiveService, url: str) -> tuple[Any, Any, Watch]:
    context = browser.new_context(viewport={"width": 1440, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    watch = Watch(service.base_url)
    watch.attach(page)
    page.add_init_script(RECORD_STATUSES)
    page.goto(url)
    return context, page, watch


def test_dashboard_follows_a_job_live_to_its_finished_curves(
    browser: Any, service: LiveService, tiny_model_dir: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    body = tiny_body(
        tiny_model_dir,
        tiny_dataset,
        checkpoint_every=5,
        optim={"max_steps": LIVE_JOB_STEPS},
        metadata={"purpose": "dashboard"},
        # a floor above any divergence: one `alarm` event at step 1, drawn on every chart
        guard={"window": 1, "divergence_floor": 1e6},
        eval={
            "dataset_uri": str(tiny_dataset),
            "every_steps": 5,
            "limit": 2,
            "n": 2,
            "max_new_tokens": 8,
        },
    )
    with service.http() as http:
        # The page is loaded before the job exists and is pointed at it through the URL, so it
        # sees the job from its first seconds however slowly the browser starts.
        url = f"{service.base_url}/ui#key={service.api_key}"
        context, page, watch = _open(browser, service, url)
        try:
            page.wait_for_selector(".job-item, #jobs-empty:not([hidden])")
            created = http.post("/jobs", json=body)
            assert created.status_code == 201, created.text
            job_id = created.json()["id"]
            page.evaluate(
                f"window.__statuses = []; window.__job = '{job_id}'; location.hash = 'job={job_id}'"
            )
            page.wait_for_function(
                f"() => document.getElementById('job-id').textContent === '{job_id}'"
            )
            page.wait_for_function(
                "() => document.getElementById('job-status').textContent === 'succeeded'",
                timeout=180_000,
            )
            page.wait_for_function(
                f"() => document.getElementById('chart-loss')?.data?.[0]?.y?.length "
                f"=== {LIVE_JOB_STEPS}",
                timeout=20_000,
            )
            statuses = page.evaluate("window.__statuses")
            assert statuses[0] in {"queued", "running"} and statuses[-1] == "succeeded", statuses

            api_loss = http.get(f"/jobs/{job_id}/metrics", params={"name": "loss"}).json()
            chart = page.evaluate(
                "() => { const d = document.getElementById('chart-loss').data[0];"
                " return {steps: Array.from(d.x), values: Array.from(d.y)}; }"
            )
            assert chart == api_loss["metrics"]["loss"]

            markers = page.evaluate(
                "() => document.getElementById('chart-loss').layout.shapes.map(s => s.x0)"
            )
            assert markers == [1]  # the collapse guard's alarm, at its step
            assert "generated tokens" in page.inner_text("#usage")
            assert "recipe" in page.inner_text("#job-meta")
            for name in ("divergence", "entropy", "lr", "grad_norm", "generated_tokens"):
                assert page.is_visible(f"#chart-{name}"), name
            assert page.is_visible("#chart-tokens_per_s")
            entropies = page.evaluate(
                "() => document.getElementById('chart-entropy').data.map(t => t.name)"
            )
            assert entropies == ["student_entropy", "teacher_entropy"]
            page.wait_for_selector("#chart-eval", state="visible", timeout=20_000)
            eval_series = page.evaluate(
                "() => document.getElementById('chart-eval').data.map(t => t.name)"
            )
            assert eval_series and all(name.startswith("eval/") for name in eval_series)

            kinds = page.eval_on_selector_all(
                "#events tbody tr", "rows => rows.map(r => r.dataset.kind)"
            )
            assert kinds[0] == "queued" and kinds[-1] == "succeeded" and "checkpoint" in kinds
            steps = page.eval_on_selector_all(
                "#checkpoints tbody tr", "rows => rows.map(r => r.dataset.step)"
            )
            assert steps == ["5", "10"]
            # the jobs list followed too
            page.wait_for_selector(f'.job-item[data-id="{job_id}"][data-status="succeeded"]')

            assert "key=" not in page.url and service.api_key not in page.url
            assert page.evaluate("localStorage.getItem('opsd.apiKey')") == service.api_key

            with page.expect_download() as download_info:
                page.click("#adapter-link")
            download = download_info.value
            assert download.suggested_filename == f"{job_id}-adapter.tar.gz"
            assert gzip.decompress(Path(download.path()).read_bytes())

            page.wait_for_timeout(300)  # let the charts settle before the picture
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            if target := os.environ.get(SCREENSHOT_ENV):
                Path(target).parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=target, full_page=True)
            assert watch.errors == []
            assert watch.foreign_requests() == []
            assert any("/ui/assets/plotly.min.js" in url for url in watch.requests)
        finally:
            context.close()


def test_sign_in_rejects_a_bad_key_and_accepts_a_good_one(
    browser: Any, service: LiveService
) -> None:
    context, page, watch = _open(browser, service, f"{service.base_url}/ui")
    try:
        page.wait_for_selector("#login", state="visible")
        assert page.is_hidden("#app")
        page.fill("#key-input", "opsd_not_a_key")
        page.click("#key-form button[type=submit]")
        page.wait_for_selector("#key-error", state="visible")
        assert "rejected" in page.inner_text("#key-error")
        assert page.evaluate("localStorage.getItem('opsd.apiKey')") is None

        page.fill("#key-input", service.api_key)
        page.click("#key-form button[type=submit]")
        page.wait_for_selector("#app", state="visible")
        page.wait_for_selector(".job-item, #jobs-empty:not([hidden])")
        assert page.inner_text("#key-badge").startswith(service.api_key[:10])
        page.click("#sign-out")
        page.wait_for_selector("#login", state="visible")
        assert page.evaluate("localStorage.getItem('opsd.apiKey')") is None
        # the rejected key's 401 is the one error the browser itself reports
        assert all(re.search(r"\b401\b", error) for error in watch.errors), watch.errors
        assert watch.foreign_requests() == []
    finally:
        context.close()


def test_front_door_and_assets_come_from_the_service(service: LiveService) -> None:
    with httpx.Client(base_url=service.base_url, timeout=30) as http:
        root = http.get("/", follow_redirects=False)
        assert root.status_code == 307 and root.headers["location"] == "/ui"

        page = http.get("/ui")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "connect-src 'self'" in policy
        sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert sources and all(s.startswith(("/", "data:", "#")) for s in sources), sources

        packaged = (resources.files("plotly") / "package_data" / "plotly.min.js").read_bytes()
        plotly = http.get("/ui/assets/plotly.min.js", headers={"Accept-Encoding": "gzip"})
        assert plotly.status_code == 200 and plotly.headers["content-encoding"] == "gzip"
        assert plotly.content == packaged  # httpx undid the gzip
        assert "immutable" in plotly.headers["cache-control"]

        script = http.get("/ui/assets/dashboard.js")
        assert script.status_code == 200 and "text/javascript" in script.headers["content-type"]
        assert "http://" not in script.text and "https://" not in script.text
        missing = http.get("/ui/assets/nothing.js")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
