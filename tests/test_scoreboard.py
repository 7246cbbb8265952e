"""The scoreboard's table and chart from a hand-made board: the seed's layout (source | raw merge | healed | Delta)."""
from __future__ import annotations

from pathlib import Path

from steps import scoreboard
from steps.evalsuite.scores import tally


def counts(passed: int, total: int, **apart: int) -> dict:
    """A category's totals as the eval writes them: ``apart`` holds draws without a verdict (truncated=1)."""
    statuses = ["pass"] * passed + [s.replace("_", " ") for s, n in apart.items() for _ in range(n)]
    statuses += ["fail"] * (total - len(statuses))
    return {"passed": passed, "total": total, **tally(statuses)}


def board() -> dict:
    def evaluated(passed: int, programming: int) -> dict:
        return {**counts(passed, 44), "tokens_per_s": 50.0, "wall_s": 60.0,
                "categories": {"basic": counts(passed - programming, 29), "programming": counts(programming, 15)}}
    return {"recipe": "m", "variants": ["m-source-a", "m", "m-healed"], "compare": ["m", "m-healed"], "models": [
        {"variant": "m-source-a", "type": "Q4_K_M", "size": 5.3e9, "ppl": 7.0, "kld_mean": 0.01,
         "eval": evaluated(41, 13)},
        {"variant": "m", "type": "Q4_K_M", "size": 9.2e9, "ppl": 8.0, "kld_mean": 0.02, "eval": evaluated(39, 11)},
        {"variant": "m-healed", "type": "Q4_K_M", "size": 9.2e9, "ppl": 7.5, "kld_mean": 0.015,
         "eval": evaluated(40, 12)}]}


def test_the_table_has_a_column_per_variant_and_healed_minus_raw() -> None:
    table = scoreboard.markdown(board())
    assert "| Figure | source a | raw merge | healed | Delta |" in table
    assert "| Q4_K_M programming | 13/15 | 11/15 | 12/15 | +7 pts (within noise) |" in table
    assert ("| Q4_K_M TOTAL | 41/44 (93 %, 82-98) | 39/44 (89 %, 76-95) | 40/44 (91 %, 79-96) "
            "| +2 pts (within noise) |") in table
    assert "| Q4_K_M PPL | 7.000 | 8.000 | 7.500 | -0.500 |" in table
    assert "| Q4_K_M size (MB) | 5300 | 9200 | 9200 | +0 |" in table


def test_the_chart_plots_score_and_kld_against_size(tmp_path: Path) -> None:
    assert scoreboard.chart(board(), tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    empty = {"recipe": "m", "variants": ["m"], "models": [{"variant": "m", "type": "base", "size": 1e9, "ppl": 8.0}]}
    assert not scoreboard.chart(empty, tmp_path / "none.png") and not (tmp_path / "none.png").exists()


def test_a_category_counted_the_other_way_gets_its_own_row_where_it_differs() -> None:
    """The eval counted only the API's tool_calls; the raw merge's tool calls came as text (a broken chat
    template): the table shows what the text calls would have scored beside the counted figure."""
    b = board()
    for row, api, text in zip(b["models"], (6, 2, 5), (6, 6, 6), strict=True):
        row["eval"]["tool_calls"] = "api"
        row["eval"]["categories"]["tools"] = {**counts(api, 6), "api": api, "text": text}
    table = scoreboard.markdown(b)
    assert "| Q4_K_M tools | 6/6 | 2/6 | 5/6 | +50 pts (within noise) |" in table
    assert "| Q4_K_M tools (text calls counted too) | 6/6 | 6/6 | 6/6 | +0 |" in table
    for row in b["models"]:
        row["eval"]["categories"]["tools"]["text"] = row["eval"]["categories"]["tools"]["api"]
    assert "text calls counted too" not in scoreboard.markdown(b)


def test_draws_without_a_verdict_are_counted_apart_and_a_clear_difference_is_not_noise() -> None:
    """A truncated or not-run draw is no failure: the rate is passes over verdicts and the rest is shown beside it;
    a difference whose interval excludes 0 carries no "within noise" mark."""
    b = board()
    raw, healed = b["models"][1]["eval"], b["models"][2]["eval"]
    raw.update(counts(10, 44, truncated=20))
    raw["categories"]["programming"] = counts(2, 15, truncated=3, not_run=4)
    healed.update(counts(40, 44))
    table = scoreboard.markdown(b)
    assert "| Q4_K_M programming | 13/15 | 2/8, 3 truncated, 4 not run | 12/15 |" in table
    assert "| Q4_K_M TOTAL | 41/44 (93 %, 82-98) | 10/24 (42 %, 24-61), 20 truncated | 40/44 (91 %, 79-96) " \
           "| +49 pts |" in table
