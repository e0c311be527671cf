"""Functions the task YAMLs in this folder name with `!function compressor_tasks.NAME`.

Datasets come from compressor.eval.taskdata (the local data folder, whose path lm-eval passes in as
the `data_dir` metadata, else Hugging Face); scoring from compressor.eval.scoring.
"""

from __future__ import annotations

from compressor.eval import scoring, taskdata


def _as_test_split(docs: list[dict]) -> dict:
    import datasets

    return {"test": datasets.Dataset.from_list(docs)}


# -- datasets (lm-eval calls custom_dataset(**metadata)) ----------------------------------------


def arc_easy(data_dir=None, **_):
    return _as_test_split(taskdata.arc("easy", data_dir))


def arc_challenge(data_dir=None, **_):
    return _as_test_split(taskdata.arc("challenge", data_dir))


def piqa(data_dir=None, **_):
    return _as_test_split(taskdata.piqa(data_dir))


def winogrande(data_dir=None, **_):
    return _as_test_split(taskdata.winogrande(data_dir))


def boolq(data_dir=None, **_):
    return _as_test_split(taskdata.boolq(data_dir))


def mmlu(data_dir=None, **_):
    return _as_test_split(taskdata.mmlu(data_dir))


def freebaseqa(data_dir=None, **_):
    return _as_test_split(taskdata.freebaseqa(data_dir))


def triviaqa(data_dir=None, **_):
    return _as_test_split(taskdata.triviaqa(data_dir))


def triviaqa_context(data_dir=None, **_):
    return _as_test_split(taskdata.triviaqa(data_dir, with_context=True))


def cnn_stories(data_dir=None, **_):
    return _as_test_split(taskdata.cnn_stories(data_dir))


def vicuna80(data_dir=None, **_):
    return _as_test_split(taskdata.vicuna80(data_dir))


# -- WinoGrande: the option is part of the context, the rest of the sentence is scored ----------


def winogrande_text(doc) -> int:
    return int(doc["answer"]) - 1


def winogrande_target(doc) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1 :].strip()


def winogrande_choices(doc) -> list[str]:
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + doc["option1"], doc["sentence"][:blank] + doc["option2"]]


# -- scoring of the generated answers ------------------------------------------------------------


def freebaseqa_results(doc, results):
    return {"exact_match": scoring.freebase_match(results[0], doc["answers"])}


def triviaqa_results(doc, results):
    prediction = scoring.first_line(results[0])
    return {
        "exact_match": scoring.lenient_exact_match(prediction, doc["aliases"]),
        "f1": scoring.token_f1(prediction, doc["aliases"]),
    }


def summary_results(doc, results):
    return {"rougeL": scoring.rouge_l(results[0], doc["highlights"])}


def vicuna_results(doc, results):
    return {"rougeL": scoring.rouge_l(results[0], doc["reference"])}
