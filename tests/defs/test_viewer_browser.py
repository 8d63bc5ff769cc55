"""The latent browser in a real browser: Playwright driving Debian's Chromium over a materialized partition.

Checks what a person would: the coders table sorts, the latent list sorts, filters and searches and
opens on explained latents, the heatmap marks exactly the tokens the exemplars say fired (value on
hover), the logit lens shows values and a histogram, windows filter by token, a scorer's permalink
shows it beside its control, the steering box continues a prompt both ways, links resolve, no page
scrolls sideways at 1400x900 or 1280x800, and nothing is fetched from outside the server.
Screenshots go to `$AUTOINTERP_SCREENSHOTS` (default: the test's tmp folder).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

import pandas as pd
import pytest

from assets.accounting import coder_accounting
from storage.layout import DataRoot
from storage.store import TableStore


def chromium() -> str:
    """Debian's chromium (Playwright's own browser download is not reachable); installed here when missing."""
    found = shutil.which("chromium")
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "chromium"], check=True, capture_output=True
        )
        found = shutil.which("chromium")
    if found is None:
        pytest.fail("No chromium. Fix: apt-get install chromium (as root), or `make install-test`.")
    return found


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, server):
    """A page that fails the test on any request outside the viewer and on any script error."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    outside, errors = [], []
    page.on("request", lambda r: None if r.url.startswith(server) else outside.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert not outside, f"fetched from outside the server: {outside}"
    assert not errors, errors


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(
        os.environ.get("AUTOINTERP_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots")
    )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def ready(page):
    page.wait_for_selector("body[data-ready='1']")


def test_coders_page_lists_the_coder_and_sorts(page, server, partition, shots):
    page.goto(server + "/")
    ready(page)
    row = page.locator(f"tr[data-coder='{partition.coder}']")
    assert row.count() == 1 and "1152" in row.inner_text()
    # every latent in one bucket: the five counts add up to the width, each as the accounting says
    found = coder_accounting(TableStore.at(partition.root), partition.coder)
    buckets = {"dead": "dead", "too rare": "too_rare", "awaiting exemplars": "awaiting_exemplars"}
    buckets |= {"explained": "explained", "failed": "failed"}
    shown = {k: int(row.locator(f"td[data-bucket='{k}']").inner_text()) for k in buckets}
    assert shown == {k: found[v] for k, v in buckets.items()} and sum(shown.values()) == 1152
    assert "min_activating_windows = 6" in row.locator("td[data-bucket='too rare']").get_attribute(
        "title"
    )
    page.locator("th", has_text="detection control").click()
    assert "sorted-desc" in page.locator("th", has_text="detection control").get_attribute("class")
    # the mean and the mean gap with their 95 % intervals as error bars; a "cannot tell" verdict in grey
    for part in ("mean", "gap"):
        bar = row.locator(f"td[data-scorer='detection'][data-part='{part}'] .errorbar")
        assert bar.locator(".whisker").count() == 1 and bar.locator(".dot").count() == 1
        assert float(bar.get_attribute("data-lo")) <= float(bar.get_attribute("data-hi"))
    assert row.locator(".verdict-cannot-tell").count() >= 1
    assert row.locator(".verdict-uninformative").count() == 0
    page.screenshot(path=str(shots / "coders.png"))
    row.locator("a").click()
    ready(page)
    assert page.url.startswith(server + "/coder?coder=")
    assert page.locator("#latents tbody tr").count() == 50


def test_latent_list_sorts_filters_searches_and_links(page, server, partition, shots):
    root = DataRoot.at(partition.root)
    explained = pd.read_parquet(root.explanations_path(partition.coder, partition.shard))
    ok = explained[explained.status == "ok"]
    page.goto(f"{server}/coder?coder={quote(partition.coder, safe='')}")
    ready(page)
    # sort by frequency, strongest first: the column reads in descending order
    page.locator("th[data-col='frequency']").click()
    page.wait_for_selector("th[data-col='frequency'].sorted-desc")
    ready(page)
    freqs = [float(t) for t in page.locator("#latents tbody tr td:nth-child(5)").all_inner_texts()]
    assert freqs == sorted(freqs, reverse=True) and freqs[0] > 0
    # filter by explanation status
    page.select_option("#status", "ok")
    page.click("#apply")
    page.wait_for_function(f"document.querySelectorAll('#latents tbody tr').length === {len(ok)}")
    ready(page)
    assert sorted(
        int(x) for x in page.locator("#latents tbody tr td:first-child").all_inner_texts()
    ) == sorted(ok.latent.tolist())
    # semantic search: the latent whose explanation it is comes first
    target = ok.iloc[-1]
    page.click("#clear")
    ready(page)
    page.fill("#search", target.explanation)
    page.press("#search", "Enter")
    page.wait_for_selector("th[data-col='distance']")
    ready(page)
    assert page.locator("#latents tbody tr").first.get_attribute("data-latent") == str(
        target.latent
    )
    page.screenshot(path=str(shots / "latents.png"))
    # the link resolves to that latent's page
    page.locator("#latents tbody tr").first.locator("a").click()
    ready(page)
    assert page.locator("#explanation .explanation").inner_text() == target.explanation


def test_latent_page_heatmap_marks_the_right_tokens(page, server, partition, shots):
    root = DataRoot.at(partition.root)
    explained = pd.read_parquet(root.explanations_path(partition.coder, partition.shard))
    latent = int(explained[explained.status == "ok"].latent.iloc[0])
    exemplars = pd.read_parquet(root.exemplars_path(partition.coder, partition.shard))
    strongest = exemplars[exemplars.latent == latent].sort_values("max_activation").iloc[-1]
    page.goto(f"{server}/latent?coder={quote(partition.coder, safe='')}&latent={latent}")
    ready(page)
    assert page.locator("#error").count() == 0
    # the strongest window is shown first among the explainer's windows; its marked tokens are the firing ones
    first = page.locator(".group-windows").first.locator(".window").first
    spans = first.locator(".tok")
    values = [float(v) for v in spans.evaluate_all("els => els.map(e => e.dataset.act)")]
    assert values == pytest.approx(list(strongest.activations), abs=1e-3)
    marked = [
        i
        for i, cls in enumerate(spans.evaluate_all("els => els.map(e => e.className)"))
        if "active" in cls
    ]
    assert marked == [i for i, a in enumerate(strongest.activations) if a > 0]
    top = marked[int(max(range(len(marked)), key=lambda j: strongest.activations[marked[j]]))]
    assert (
        spans.nth(top)
        .get_attribute("title")
        .endswith(str(round(float(strongest.activations[top]), 4)))
    )
    unmarked = next(i for i in range(len(values)) if i not in marked)
    assert "rgba" in spans.nth(top).get_attribute("style") and not spans.nth(
        unmarked
    ).get_attribute("style")
    # the parts a person looks for
    assert page.locator("#candidates tr").count() == 3  # header + two best-of-N candidates
    assert page.locator("#scorers tr[data-scorer]").count() == 4
    assert page.locator("#scorers .errorbar .whisker").count() >= 1  # a score's 95 % interval
    assert (
        page.locator("#promoted span").count() == 10
        and page.locator("#suppressed span").count() == 10
    )
    assert page.locator("#density div").count() == 24
    assert page.locator("#simulation .sim-pair").count() > 0
    assert page.locator("#non-activating [data-source]").count() >= 2
    assert "partition=" in page.locator("#dagster-link").get_attribute("href")
    page.screenshot(path=str(shots / "latent.png"), full_page=False)
    # a neighbour link resolves to that latent's page
    neighbour = page.locator("a.neighbour").first
    target = neighbour.inner_text()
    neighbour.click()
    ready(page)
    assert page.locator("h1").inner_text().startswith(f"Latent {target}")
    assert page.locator("#error").count() == 0


def test_a_bad_latent_shows_the_error_with_the_fix(page, server, partition):
    page.goto(f"{server}/latent?coder={quote(partition.coder, safe='')}&latent=5000")
    ready(page)
    assert "0..1151" in page.locator("#error").inner_text()


@pytest.mark.parametrize("width,height", [(1400, 900), (1280, 800)])
def test_every_page_fits_a_laptop_window(browser, server, partition, shots, width, height):
    """No page scrolls sideways (the latent list's columns overflowed 1400 px and the header bar stopped short)."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    coder = quote(partition.coder, safe="")
    try:
        for name, path in (
            ("coders", "/"),
            ("latents", f"/coder?coder={coder}"),
            ("latent", f"/latent?coder={coder}&latent=0&scorer=detection"),
        ):
            page.goto(server + path)
            ready(page)
            assert page.locator("#error").count() == 0
            scroll, inner = page.evaluate(
                "[document.documentElement.scrollWidth, window.innerWidth]"
            )
            assert scroll <= inner, f"{name} page is {scroll} px wide in a {inner} px window"
            header = page.evaluate("document.querySelector('header').getBoundingClientRect().width")
            assert header == pytest.approx(inner, abs=1)
            page.screenshot(path=str(shots / f"{name}-{width}x{height}.png"))
    finally:
        context.close()


def test_latent_list_opens_on_explained_latents(page, server, partition):
    page.goto(f"{server}/coder?coder={quote(partition.coder, safe='')}")
    ready(page)
    assert "explained first" in page.locator("#summary").inner_text()
    statuses = page.locator("#latents tbody tr td:nth-child(2)").all_inner_texts()
    explained = pd.read_parquet(
        DataRoot.at(partition.root).explanations_path(partition.coder, partition.shard)
    )
    n_ok = int((explained.drop_duplicates("latent", keep="last").status == "ok").sum())
    assert n_ok > 0 and statuses[:n_ok] == ["ok"] * n_ok


def test_latent_page_shows_logits_filters_windows_by_token_and_links_a_scorer(
    page, server, partition, shots
):
    import json
    import urllib.request

    coder = quote(partition.coder, safe="")
    explained = pd.read_parquet(
        DataRoot.at(partition.root).explanations_path(partition.coder, partition.shard)
    )
    latent = int(explained[explained.status == "ok"].latent.iloc[0])
    with urllib.request.urlopen(f"{server}/api/latent?coder={coder}&latent={latent}") as response:
        api = json.loads(response.read())
    page.goto(f"{server}/latent?coder={coder}&latent={latent}")
    ready(page)
    # logit values beside the tokens, and the histogram over the vocabulary
    shown = [float(v) for v in page.locator("#promoted span b").all_inner_texts()]
    assert shown == pytest.approx([t["logit"] for t in api["logit_lens"]["promoted"]], abs=0.006)
    assert page.locator("#suppressed span b").count() == 10
    assert page.locator("#logit-histogram div").count() == len(
        api["logit_lens"]["histogram"]["counts"]
    )
    # top activations searchable by token: only windows holding the token stay, the token outlined
    strongest = api["windows"]["activating"][0]["windows"][0]
    token = max(
        (a, t)
        for a, t in zip(strongest["activations"], strongest["tokens"], strict=False)
        if t.strip()
    )[1].strip()
    page.fill("#token-search", token)
    windows = page.locator("#windows .window")
    visible = [i for i in range(windows.count()) if windows.nth(i).is_visible()]
    holding = [
        w
        for g in api["windows"]["activating"]
        for w in g["windows"]
        if any(token.lower() in t.lower() for t in w["tokens"])
    ]
    assert len(visible) == len(holding) > 0
    assert all(windows.nth(i).locator(".tok.match").count() > 0 for i in visible)
    assert page.locator("#token-summary").inner_text().startswith(f"{len(holding)} of ")
    page.locator("#token-search").scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "latent-token-search.png"))
    page.fill("#token-search", "")
    assert all(windows.nth(i).is_visible() for i in range(windows.count()))
    # a scorer's permalink shows that scorer's score beside its control's, first
    detection = next(s for s in api["scorers"] if s["name"] == "detection")
    page.locator("tr[data-scorer='detection'] a.permalink").click()
    ready(page)
    assert page.url.endswith(f"latent={latent}&scorer=detection")
    pinned = page.locator("#pinned-scorer")
    score, _, interval = pinned.locator(".score").inner_text().partition(" [")
    assert float(score) == pytest.approx(detection["score"], abs=5e-4)
    if (
        None not in detection["interval"]
    ):  # the 95 % interval beside the score, as the table shows it
        lo, hi = (float(x) for x in interval.rstrip("]").split(", "))
        assert (lo, hi) == pytest.approx(tuple(detection["interval"]), abs=5e-4)
    assert float(pinned.locator(".control").inner_text()) == pytest.approx(
        detection["control_score"], abs=5e-4
    )
    assert detection["control_explanation"] in pinned.inner_text()
    assert "pinned" in page.locator("tr[data-scorer='detection']").get_attribute("class")
    page.screenshot(path=str(shots / "latent-permalink.png"))


def test_steering_box_shows_both_continuations_side_by_side(page, server, partition, shots):
    explained = pd.read_parquet(
        DataRoot.at(partition.root).explanations_path(partition.coder, partition.shard)
    )
    latent = int(explained[explained.status == "ok"].latent.iloc[0])
    page.goto(f"{server}/latent?coder={quote(partition.coder, safe='')}&latent={latent}")
    ready(page)
    page.fill("#steer-prompt", "The file")
    page.fill("#steer-strength", "8")
    page.fill("#steer-tokens", "12")
    page.click("#steer-go")
    page.wait_for_selector("#steered .window", timeout=300_000)
    unsteered, steered = (
        page.locator("#unsteered .window b").inner_text(),
        page.locator("#steered .window b").inner_text(),
    )
    assert unsteered and steered and unsteered != steered
    assert "KL" in page.locator("#steer-status").inner_text()
    page.locator("#steering").scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "latent-steering.png"))


def test_latent_page_shows_each_sense_with_its_scores_beside_the_union(
    browser, partition, tmp_path, shots
):
    import threading

    from autointerp_defs.readside.server import make_server
    from tests.defs.conftest import with_two_senses

    several, _ = with_two_senses(partition, tmp_path / "copy", union_scored=True)
    union = (
        pd.read_parquet(
            DataRoot.at(tmp_path / "copy").scores_path(
                partition.coder, partition.shard, "detection"
            )
        )
        .set_index("latent")
        .loc[several]
    )
    httpd = make_server(str(tmp_path / "copy"), port=0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        page.goto(
            f"http://127.0.0.1:{httpd.server_port}/latent?coder={quote(partition.coder, safe='')}&latent={several}"
        )
        ready(page)
        senses = page.locator("#senses tr.sense")
        assert senses.count() == 2
        assert senses.nth(0).locator("td").all_inner_texts() == [
            "digits inside parentheses",
            "5",
            "2",
            "0.900 (control 0.400)",
        ]
        assert senses.nth(1).locator("td").all_inner_texts() == [
            "names inside quotation marks",
            "3",
            "1",
            "–",
        ]  # its score was of another text

        def shown(v):  # the page's `fmt`
            return str(int(v)) if float(v).is_integer() else f"{v:.3f}"

        score, control = union["balanced_accuracy"], union["control_balanced_accuracy"]
        assert (
            page.locator("#senses tr.union td").nth(3).inner_text()
            == f"{shown(score)} (control {shown(control)})"
        )
        page.locator("#senses").screenshot(path=str(shots / "latent-senses.png"))
        page.goto(
            f"http://127.0.0.1:{httpd.server_port}/coder?coder={quote(partition.coder, safe='')}"
        )  # the list: one click lists it alone
        ready(page)
        page.click("#several-senses")
        page.wait_for_function("document.querySelectorAll('#latents tbody tr').length === 1")
        ready(page)
        row = page.locator("#latents tbody tr").first
        assert (
            row.get_attribute("data-latent") == str(several)
            and row.locator("td").nth(3).inner_text() == "2"
        )
        assert page.locator("th[data-col='detection_min_sense']").count() == 1
        page.screenshot(path=str(shots / "latents-senses.png"))
    finally:
        context.close()
        httpd.shutdown()
        httpd.server_close()


def test_latent_page_shows_the_second_text_beside_the_first_with_both_scores(
    browser, partition, tmp_path
):
    """`[explanations] stability_latents`: a latent explained again from other windows shows both texts side by
    side, each with its detection score, and their similarity; a second text drawn beside an explanation
    since replaced is not shown."""
    import threading

    from autointerp_defs.readside.server import make_server
    from storage.tables import write_table

    root = tmp_path / "copy"
    shutil.copytree(partition.root, root, ignore=shutil.ignore_patterns("viewer", "llm_cache"))
    layout, coder, shard = DataRoot.at(root), partition.coder, partition.shard
    explained = pd.read_parquet(layout.explanations_path(coder, shard))
    first, other = list(explained[explained.status == "ok"].itertuples())[:2]
    write_table(
        pd.DataFrame(
            {
                "latent": [first.latent, other.latent],
                "explanation": ["a second text", "drawn beside an older text"],
                "first_explanation": [first.explanation, "an older text"],
                "windows": 6,
                "similarity": [0.25, 0.5],
                "status": "ok",
                "error": "",
                "prompt_tokens": 0,
                "completion_tokens": 0,
            }
        ),
        layout.explanation_reseeds_path(coder, shard),
        "explanation_reseeds",
    )
    scores = pd.read_parquet(layout.scores_path(coder, shard, "detection"))
    write_table(
        scores[scores.latent == first.latent].assign(
            explanation="a second text", balanced_accuracy=0.55
        ),
        layout.reseed_scores_path(coder, shard, "detection"),
        "reseed_scores",
    )
    score = float(scores.set_index("latent").loc[first.latent, "balanced_accuracy"])
    httpd = make_server(str(root), port=0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        base = f"http://127.0.0.1:{httpd.server_port}/latent?coder={quote(coder, safe='')}"
        page.goto(f"{base}&latent={first.latent}")
        ready(page)
        shown = str(int(score)) if score.is_integer() else f"{score:.3f}"
        assert page.locator("#reseed tr.first td").all_inner_texts() == [
            "first",
            first.explanation,
            shown,
        ]
        assert page.locator("#reseed tr.second td").all_inner_texts() == [
            "second (6 other windows)",
            "a second text",
            "0.550",
        ]
        assert page.locator("#reseed-similarity").inner_text().endswith("0.250")
        page.goto(f"{base}&latent={other.latent}")
        ready(page)
        assert page.locator("#reseed").count() == 0
    finally:
        context.close()
        httpd.shutdown()
        httpd.server_close()
