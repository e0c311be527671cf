"""Knowledge and zero-shot tasks: scoring on hand-made answers, the loaders on small fixture folders,
lm-eval runs on a tiny model checked against a hand-computed log-likelihood, recovery gates, the
judge against a local stub server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch

from compressor.errors import CompressorError
from compressor.eval import harness, scoring, taskdata
from compressor.eval.judge import JudgeSettings, judge_task

# -- scoring ---------------------------------------------------------------------------------


def test_freebase_match_ignores_case_and_spaces_and_checks_aliases():
    assert scoring.freebase_match("It is Withnail and I, of course", ["withnail and i"]) == 1.0
    assert scoring.freebase_match("The answer: MIDWAYgames", ["Mid way"]) == 1.0
    assert scoring.freebase_match("pig", ["boar", "Pig"]) == 1.0  # any alias
    assert scoring.freebase_match("a sheep", ["pig"]) == 0.0
    assert scoring.freebase_match("anything", [""]) == 0.0  # an empty gold name matches nothing


def test_squad_normalisation_and_lenient_exact_match():
    assert scoring.squad_normalize("The  Swiss-Miss!") == "swissmiss"
    assert scoring.squad_normalize("An apple, a pear") == "apple pear"
    aliases = ["hingis", "martina hingis"]
    assert scoring.lenient_exact_match("Martina Hingis.", aliases) == 1.0
    assert (
        scoring.lenient_exact_match("It was Martina Hingis of Switzerland", aliases) == 1.0
    )  # gold in guess
    assert scoring.lenient_exact_match("Hingis", ["martina hingis"]) == 1.0  # guess in gold
    assert scoring.lenient_exact_match("Steffi Graf", aliases) == 0.0
    assert scoring.lenient_exact_match("The", aliases) == 0.0  # normalises to empty: no match


def test_token_f1_known_values():
    assert scoring.token_f1("martina hingis", ["martina hingis"]) == 1.0
    # 1 common token; precision 1/3, recall 1/2 -> F1 0.4
    assert scoring.token_f1("martina navratilova tennis", ["martina hingis"]) == pytest.approx(0.4)
    assert scoring.token_f1("graf", ["hingis", "graf steffi"]) == pytest.approx(2 / 3)  # best alias
    assert scoring.token_f1("", ["hingis"]) == 0.0


def test_first_line_is_the_prediction():
    assert scoring.first_line("\n  Paris \nQ: next question") == "Paris"
    assert scoring.first_line("   ") == ""


@pytest.mark.parametrize(
    "candidate,reference",
    [
        ("the cat sat on the mat", "the cat lay on the mat"),
        ("Police killed the gunman.", "The gunman was killed by police on Friday."),
        ("a b c d e", "e d c b a"),
        ("nothing shared", "at all here"),
    ],
)
def test_rouge_l_matches_rouge_score(candidate, reference):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    expected = rouge_scorer.RougeScorer(["rougeL"]).score(reference, candidate)["rougeL"].fmeasure
    assert scoring.rouge_l(candidate, reference) == pytest.approx(expected)


def test_parse_judge_scores_formats():
    assert scoring.parse_judge_scores("8 6\nAssistant 1 was better.") == [(8.0, 6.0)]
    assert scoring.parse_judge_scores("7.5, 9\nbecause") == [(7.5, 9.0)]
    four = "8 7\n9 6\n7 7\n8 5\nExplanation: 2 reasons"
    assert scoring.parse_judge_scores(four, pairs=4) == [(8, 7), (9, 6), (7, 7), (8, 5)]
    assert scoring.parse_judge_scores("Assistant 1 gets 8 and Assistant 2 gets 6") is None
    assert scoring.parse_judge_scores("8 7\nonly one line of scores", pairs=4) is None


def test_mmlu_breakdown_counts_every_question_once():
    rows = [("abstract_algebra", 1.0), ("abstract_algebra", 0.0), ("anatomy", 1.0), ("philosophy", 0.0)]
    found = scoring.mmlu_breakdown(rows)
    assert found["acc"] == pytest.approx(2 / 4)  # divided by the questions scored, not one more
    assert found["questions"] == 4
    assert found["categories"] == {
        "STEM": 0.5,
        "humanities": 0.0,
        "other (business, health, misc.)": 1.0,
    }
    assert found["subjects"]["abstract_algebra"] == 0.5
    assert sum(len(v) for v in scoring.MMLU_CATEGORIES.values()) == 57


# -- loaders on fixture folders ------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture
def task_data(tmp_path) -> Path:
    """A miniature data folder in the layout of ../shared/data."""
    root = tmp_path / "data"
    arc = [
        {"query": "Question: What do plants need?", "choices": ["sunlight", "rocks"], "gold": 0},
        {"query": "Question: Ice is frozen what?", "choices": ["sand", "water", "air"], "gold": 1},
        {"query": "Question: Fish live in?", "choices": ["trees", "water"], "gold": 1},
    ]
    _write(root / taskdata.ZEROSHOT["arc_easy"], _jsonl(arc))
    wino = [
        {
            "context_options": [
                "They wanted to ruin the bed and the blanket, but the blanket",
                "They wanted to ruin the bed and the blanket, but the bed",
            ],
            "continuation": "was't ruined.",
            "gold": 1,
        }
    ]
    _write(root / taskdata.ZEROSHOT["winogrande"], _jsonl(wino))
    boolq = [
        {
            "query": "Passage: Water boils at 100 C.\nQuestion: does water boil at 100 c?",
            "choices": ["no", "yes"],
            "gold": 1,
        }
    ]
    _write(root / taskdata.ZEROSHOT["boolq"], _jsonl(boolq))
    _write(root / taskdata.ZEROSHOT["piqa"], _jsonl([{"goal": "open a jar", "sol1": "twist", "sol2": "eat"}]))
    _write(root / "zeroshot/piqa/valid-labels.lst", "0\n")
    kick = root / taskdata.KICK
    _write(kick / "mmlu/dev/anatomy_dev.csv", "Dev q1?,a,b,c,d,A\nDev q2?,e,f,g,h,B\n")
    _write(kick / "mmlu/test/anatomy_test.csv", "Test q1?,w,x,y,z,C\nTest q2?,w,x,y,z,D\n")
    _write(kick / "mmlu/dev/philosophy_dev.csv", "Phil dev?,a,b,c,d,D\n")
    _write(kick / "mmlu/test/philosophy_test.csv", "Phil test?,a,b,c,d,A\n")
    _write(
        kick / "freebaseqa/FreebaseQA-eval.txt",
        "A boar is what type of creature? | pig \nA boar is what type of creature? | swine \n"
        "Who wrote it? | someone \n",
    )
    trivia = {
        "Data": [
            {
                "Question": "Melanie Molitor is the mom of which tennis player?",
                "Answer": {"NormalizedAliases": ["martina hingis", "hingis"]},
                "Context": "Martina Hingis, whose mother Melanie Molitor coached her, ...",
            },
            {"Question": "No context here?", "Answer": {"NormalizedAliases": ["x"]}},
        ]
    }
    _write(kick / "triviaqa/verified-wikipedia-dev.json", json.dumps(trivia))
    story = (
        "(CNN) -- First paragraph.\n\nSecond paragraph.\n\n@highlight\n\nHighlight one\n\n@highlight\n\nTwo\n"
    )
    _write(kick / "cnndm_summarization/selected_stories/small/abc.story", story)
    vicuna = kick / "instruction_following_vicuna80"
    _write(
        vicuna / "table/question.jsonl",
        _jsonl([{"question_id": 1, "text": "Say hi.", "category": "generic"}]),
    )
    _write(vicuna / "answer.jsonl", _jsonl([{"question_id": 1, "text": "Hi there!"}]))
    prompt = {
        "system_prompt": "Judge.",
        "prompt_template": "[Question]\n{question}\n[1]\n{answer_1}\n[2]\n{answer_2}\n[System]\n{prompt}\n",
        "defaults": {"prompt": "Score both."},
    }
    _write(
        vicuna / "table/prompt.jsonl",
        _jsonl([{**prompt, "category": c} for c in ("general", "coding", "math")]),
    )
    return root


def test_zero_shot_loaders_convert_to_lm_eval_schemas(task_data):
    arc = taskdata.arc("easy", task_data)
    assert arc[1] == {
        "question": "Ice is frozen what?",
        "choices": {"text": ["sand", "water", "air"], "label": ["A", "B", "C"]},
        "answerKey": "B",
    }
    wino = taskdata.winogrande(task_data)[0]
    # The options differ after a shared "b": the split backs off to the last word boundary.
    assert wino["option1"] == "blanket" and wino["option2"] == "bed" and wino["answer"] == "2"
    assert wino["sentence"] == "They wanted to ruin the bed and the blanket, but the _ was't ruined."
    boolq = taskdata.boolq(task_data)[0]
    assert boolq == {"passage": "Water boils at 100 C.", "question": "does water boil at 100 c", "label": 1}
    assert taskdata.piqa(task_data) == [{"goal": "open a jar", "sol1": "twist", "sol2": "eat", "label": 0}]


def test_winogrande_choices_rebuild_the_original_contexts(task_data):
    module = _task_module()
    doc = taskdata.winogrande(task_data)[0]
    assert module.winogrande_choices(doc) == [
        "They wanted to ruin the bed and the blanket, but the blanket",
        "They wanted to ruin the bed and the blanket, but the bed",
    ]
    assert module.winogrande_target(doc) == "was't ruined."
    assert module.winogrande_text(doc) == 1


def _task_module():
    import importlib.util

    path = harness.config_dir() / "compressor_tasks.py"
    spec = importlib.util.spec_from_file_location("compressor_tasks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mmlu_prompt_is_the_hendrycks_format_and_subjects_interleave(task_data):
    docs = taskdata.mmlu(task_data)
    # Subjects alternate, so a --limit samples each of them.
    assert [d["subject"] for d in docs] == ["anatomy", "philosophy", "anatomy"]
    assert docs[0]["answer"] == 2 and docs[2]["answer"] == 3
    assert docs[0]["category"] == "other (business, health, misc.)"
    assert docs[0]["prompt"] == (
        "The following are multiple choice questions (with answers) about  anatomy.\n\n"
        "Dev q1?\nA. a\nB. b\nC. c\nD. d\nAnswer: A\n\n"
        "Dev q2?\nA. e\nB. f\nC. g\nD. h\nAnswer: B\n\n"
        "Test q1?\nA. w\nB. x\nC. y\nD. z\nAnswer:"
    )


def test_kick_loaders(task_data):
    assert taskdata.freebaseqa(task_data) == [
        {"question": "A boar is what type of creature?", "answers": ["pig", "swine"]},
        {"question": "Who wrote it?", "answers": ["someone"]},
    ]
    closed = taskdata.triviaqa(task_data)
    assert len(closed) == 2 and closed[1]["context"] == ""
    open_book = taskdata.triviaqa(task_data, with_context=True)
    assert [d["aliases"] for d in open_book] == [["martina hingis", "hingis"]]
    story = taskdata.cnn_stories(task_data)[0]
    assert story["highlights"] == "Highlight one\nTwo"
    assert story["prompt"].endswith("(CNN) -- First paragraph.\n\nSecond paragraph.")
    assert "Highlight one" not in story["prompt"]  # the reference stays out of the prompt
    assert taskdata.vicuna80(task_data)[0]["reference"] == "Hi there!"


def test_open_book_without_context_is_a_clear_error(tmp_path):
    root = tmp_path / "data"
    trivia = {"Data": [{"Question": "q?", "Answer": {"NormalizedAliases": ["a"]}}]}
    _write(root / taskdata.KICK / "triviaqa/verified-wikipedia-dev.json", json.dumps(trivia))
    with pytest.raises(CompressorError, match="no context passages"):
        taskdata.triviaqa(root, with_context=True)


def test_generated_answers_are_scored_by_the_task_functions(task_data):
    module = _task_module()
    doc = taskdata.freebaseqa(task_data)[0]
    assert module.freebaseqa_results(doc, ["Swine, obviously"]) == {"exact_match": 1.0}
    trivia = taskdata.triviaqa(task_data)[0]
    found = module.triviaqa_results(trivia, [" Martina Hingis\nQ: another"])
    assert found == {"exact_match": 1.0, "f1": 1.0}


def test_unknown_task_is_refused():
    with pytest.raises(CompressorError, match="unknown task 'hellaswag'"):
        harness.expand(["zeroshot", "hellaswag"])
    assert harness.expand(["kick_mmlu", "kick"])[:2] == ["kick_mmlu", "kick_freebaseqa"]


# -- lm-eval on a tiny model -------------------------------------------------------------------


def _continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    prefix = len(tokenizer(context, add_special_tokens=False).input_ids)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return float(sum(logp[i - 1, whole[i]] for i in range(prefix, len(whole))))


def test_arc_accuracy_matches_a_hand_computed_log_likelihood(task_data):
    pytest.importorskip("lm_eval")
    from tests.conftest import make_model, make_tokenizer

    model, tokenizer = make_model("llama"), make_tokenizer()
    found = harness.run_task(model, tokenizer, "arc_easy", task_data, limit=3)
    expected = []
    for doc in taskdata.arc("easy", task_data):
        context = f"Question: {doc['question']}\nAnswer:"
        scores = [_continuation_logprob(model, tokenizer, context, " " + c) for c in doc["choices"]["text"]]
        expected.append(float(max(range(len(scores)), key=scores.__getitem__) == ord(doc["answerKey"]) - 65))
    assert found["samples"] == 3
    assert found["metrics"]["acc"] == pytest.approx(sum(expected) / 3)
    assert set(found["metrics"]) == {"acc", "acc_norm"} and found["chance"] == 0.25


def test_generation_task_keeps_its_outputs(task_data):
    pytest.importorskip("lm_eval")
    from tests.conftest import make_model, make_tokenizer

    model, tokenizer = make_model("qwen2"), make_tokenizer()
    found = harness.run_task(model, tokenizer, "kick_freebaseqa", task_data, limit=2)
    assert found["samples"] == 2 and len(found["outputs"]) == 2
    assert all(isinstance(o, str) for o in found["outputs"])
    assert found["metrics"]["exact_match"] in (0.0, 0.5, 1.0)
    # Open-book TriviaQA runs on the one fixture question that carries a context passage.
    found = harness.run_task(model, tokenizer, "kick_triviaqa_open", task_data)
    assert found["samples"] == 1 and set(found["metrics"]) == {"exact_match", "f1"}


# -- judge against a stub server ----------------------------------------------------------------


class _StubJudge(BaseHTTPRequestHandler):
    replies: list[str] = []
    seen: list[dict] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"body": body, "auth": self.headers.get("Authorization")})
        reply = type(self).replies[(len(type(self).seen) - 1) % len(type(self).replies)]
        payload = json.dumps({"choices": [{"message": {"content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_judge():
    _StubJudge.seen = []
    server = HTTPServer(("127.0.0.1", 0), _StubJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, _StubJudge
    server.shutdown()


def test_judge_scores_compressed_and_dense_against_the_reference(task_data, stub_judge, monkeypatch):
    server, handler = stub_judge
    handler.replies = ["9 6\nAssistant 1 is more complete.", "9 8\nclose"]
    monkeypatch.setenv("OPENAI_API_KEY", "secret")
    settings = JudgeSettings(url=f"http://127.0.0.1:{server.server_port}/v1", model="stub")
    found = {"outputs": ["hello"], "dense": {"outputs": ["Hi! Nice to meet you."]}}
    judged = judge_task(settings, "kick_vicuna", found, task_data, limit=None)
    assert judged["compressed"] == {"score": 6.0, "reference_score": 9.0, "parsed": 1, "asked": 1}
    assert judged["dense"]["score"] == 8.0
    assert judged["recovery"] == pytest.approx(0.75)
    first = handler.seen[0]
    assert first["auth"] == "Bearer secret" and first["body"]["model"] == "stub"
    user = first["body"]["messages"][1]["content"]
    assert "Say hi." in user and "Hi there!" in user and "hello" in user  # question, reference, answer


def test_judge_reply_without_scores_is_not_counted(task_data, stub_judge):
    server, handler = stub_judge
    handler.replies = ["I cannot decide."]
    settings = JudgeSettings(url=f"http://127.0.0.1:{server.server_port}/v1")
    judged = judge_task(settings, "kick_vicuna", {"outputs": ["hello"]}, task_data, limit=None)
    assert judged["compressed"]["parsed"] == 0 and judged["compressed"]["score"] is None


def test_unreachable_judge_is_one_clear_error(task_data):
    settings = JudgeSettings(url="http://127.0.0.1:9/v1", timeout=2)
    with pytest.raises(CompressorError, match="judge at http://127.0.0.1:9/v1 failed"):
        judge_task(settings, "kick_vicuna", {"outputs": ["x"]}, task_data, limit=None)


# -- compress eval --tasks / --min-recovery, compress report ---------------------------------------


def test_eval_tasks_recovery_gate_and_dense_cache(
    llama_dir, task_data, tmp_path, capsys, monkeypatch, isolated_cache
):
    pytest.importorskip("lm_eval")
    from tests.test_cli import run_cli

    out = tmp_path / "w2"
    code, _, stderr = run_cli(
        ["quantize", llama_dir, "--method", "rtn", "--bits", "2", "--group-size", "32", "-o", out, "--json"],
        capsys,
        monkeypatch,
    )
    assert code == 0, stderr
    args = ["eval", out, "--tasks", "arc_easy", "--limit", "3", "--data-dir", task_data, "--json"]
    code, stdout, stderr = run_cli(args, capsys, monkeypatch)
    assert code == 0, stderr
    result = json.loads(stdout)
    arc = result["tasks"]["arc_easy"]
    assert result["perplexity"] is None  # not asked for
    assert arc["samples"] == 3 and arc["dense"]["samples"] == 3
    assert result["recovery"]["arc_easy"] == pytest.approx(
        arc["metrics"]["acc"] / arc["dense"]["metrics"]["acc"], abs=1e-4
    )
    assert "| arc_easy | 3 |" in (out / "eval.md").read_text()
    cached = list((isolated_cache / "dense").glob("*.json"))
    assert len(cached) == 1  # the dense model's arc_easy result

    # Same run again: the dense result comes from the cache (same seconds, not re-measured).
    code, stdout, _ = run_cli(args, capsys, monkeypatch)
    assert json.loads(stdout)["tasks"]["arc_easy"]["dense"]["seconds"] == arc["dense"]["seconds"]

    # The dense model against itself recovers exactly 1; a gate above that fails with one line.
    code, stdout, stderr = run_cli(
        [
            "eval",
            llama_dir,
            "--baseline",
            llama_dir,
            "--tasks",
            "arc_easy",
            "--limit",
            "3",
            "--data-dir",
            task_data,
            "--report",
            tmp_path / "self",
            "--min-recovery",
            "1.0",
            "--json",
        ],
        capsys,
        monkeypatch,
    )
    assert code == 0, stderr
    itself = json.loads(stdout)["tasks"]["arc_easy"]
    assert itself["metrics"] == itself["dense"]["metrics"]
    code, _, stderr = run_cli([*args, "--min-recovery", "1000"], capsys, monkeypatch)
    assert code == 1 and "recovery below 1000.0: arc_easy" in stderr


def test_eval_refuses_unknown_task_before_loading(llama_dir, capsys, monkeypatch):
    from tests.test_cli import run_cli

    code, _, stderr = run_cli(["eval", llama_dir, "--tasks", "ppl,nonsense"], capsys, monkeypatch)
    assert code == 2 and "unknown task 'nonsense'" in stderr


def _fake_run(folder: Path, name: str, bpw: float, ppl: float, recovery: float, bits: list[int]) -> None:
    run = folder / name
    run.mkdir(parents=True)
    tasks = {
        "arc_easy": {
            "metrics": {"acc": 0.4 * recovery, "acc_norm": 0.4},
            "stderr": {},
            "primary": "acc",
            "samples": 10,
            "seconds": 1.0,
            "dense": {"metrics": {"acc": 0.4}, "samples": 10, "seconds": 1.0},
        }
    }
    result = {
        "model": str(run),
        "compression": {"method": "gptq", "bpw": bpw},
        "perplexity": {"ppl": ppl},
        "kl": {"kl": 0.1},
        "tasks": tasks,
        "recovery": {"ppl": 20.0 / ppl, "arc_easy": recovery},
    }
    (run / "eval.json").write_text(json.dumps(result))
    modules = {f"model.layers.{i}.mlp.down_proj": {"bpw": b, "shape": [4, 4]} for i, b in enumerate(bits)}
    (run / "compress.json").write_text(json.dumps({"modules": modules}))


def test_report_renders_markdown_and_html(tmp_path, capsys, monkeypatch):
    from tests.test_cli import run_cli

    _fake_run(tmp_path / "runs", "w4", 4.25, 24.0, 0.95, [4, 4, 4])
    _fake_run(tmp_path / "runs", "w3", 3.25, 40.0, 0.80, [3, 4, 3])
    page, text = tmp_path / "report.html", tmp_path / "report.md"
    code, stdout, stderr = run_cli(
        ["report", tmp_path / "runs", "--html", page, "--markdown", text, "--json"], capsys, monkeypatch
    )
    assert code == 0, stderr
    assert json.loads(stdout)["runs"] == ["w3", "w4"]
    markdown = text.read_text()
    assert "| w4 | gptq | 4.250 | 24.000 | 0.1000 | 0.380 (0.950) |" in markdown
    html = page.read_text()
    assert html.count("<svg") == 3 and html.count('class="point"') == 2
    assert html.count('class="series"') == 2 and html.count('class="bar"') == 4
    assert "http" not in html.replace("http://www.w3.org/2000/svg", "")  # self-contained


def test_report_without_runs_is_a_clear_error(tmp_path, capsys, monkeypatch):
    from tests.test_cli import run_cli

    code, _, stderr = run_cli(["report", tmp_path], capsys, monkeypatch)
    assert code == 2 and "no eval.json found" in stderr


def test_report_opens_in_headless_chromium_with_its_plots(tmp_path, capsys, monkeypatch):
    """The HTML report, opened in a real browser: three plots laid out with non-zero size, one
    point per run, one bar per (run, task)."""
    import os

    launcher = os.environ.get("COMPRESSOR_CHROMIUM", "")
    if not launcher or not Path(launcher).is_file():
        pytest.skip("no headless Chromium: `make test` fetches one with .ci/get-chromium.sh")
    sync_api = pytest.importorskip("playwright.sync_api")
    from tests.test_cli import run_cli

    _fake_run(tmp_path / "runs", "w4", 4.25, 24.0, 0.95, [4, 4, 4])
    _fake_run(tmp_path / "runs", "w3", 3.25, 40.0, 0.80, [3, 4, 3])
    page_path = tmp_path / "report.html"
    code, _, stderr = run_cli(["report", tmp_path / "runs", "--html", page_path], capsys, monkeypatch)
    assert code == 0, stderr
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=launcher, env={})
        try:
            page = browser.new_page()
            page.goto(page_path.as_uri())
            assert page.title() == "compressor runs"
            plots = page.locator("svg.plot")
            assert plots.count() == 3
            for number in range(3):
                box = plots.nth(number).bounding_box()
                assert box and box["width"] > 100 and box["height"] > 100
            assert page.locator("circle.point").count() == 2
            assert page.locator("polyline.series").count() == 2
            assert page.locator("rect.bar").count() == 4
            widths = [page.locator("rect.bar").nth(i).bounding_box()["width"] for i in range(4)]
            assert all(w > 0 for w in widths)
            assert page.locator("table tr").count() == 3  # header + two runs
        finally:
            browser.close()


def test_limit_takes_a_default_and_per_task_values():
    from compressor.cli import parse_limits

    assert parse_limits("0") == (None, {}) == parse_limits("full")
    default, per_task = parse_limits("quick")
    assert default == 200 and per_task["kick_mmlu"] == 285 and per_task["kick_summarize"] == 5
    assert parse_limits("200,kick_summarize=10") == (200, {"kick_summarize": 10})
    assert parse_limits("kick_mmlu=0") == (None, {"kick_mmlu": None})
    with pytest.raises(CompressorError, match="not quick, full, N or TASK=N"):
        parse_limits("ten")
    with pytest.raises(CompressorError, match="unknown task 'mmlu'"):
        parse_limits("mmlu=5")
