"""`qforge eval --task` against EleutherAI's lm-evaluation-harness itself (lm-eval 0.4.13, its HF
backend `hf` on CPU, fp32), on local task YAMLs over the same JSONL files:
- a HellaSwag-shaped cloze task made by scripts/make_cloze_task.py from held-out KJV text, plus
  hand-made documents whose choices differ in characters vs bytes so that acc_norm (characters)
  and acc_bytes (bytes) disagree, whose query ends in whitespace (_encode_pair's move) or is empty
  (the prefix token);
- the same task 1-shot from itself (first_n, the eval document left out);
- an MMLU-shaped task (MMLU's template and description, 2-shot from a dev file, first_n), whose
  prompts exceed the model's context (left truncation);
- a perplexity task (loglikelihood_rolling) with documents several windows long, short, empty and
  with Unicode whitespace (word_perplexity, byte_perplexity, bits_per_byte).
Two models: a transformers Llama with a byte-level BPE tokenizer.json that adds no BOS (prefix
token = BOS from tokenizer_config.json), and a qforge-trained run exported with `qforge export
--format hf` (sentencepiece tokenizer.model that adds BOS: rolling windows start BOS, BOS).
Every log-likelihood request agrees within 1e-4 (a rolling document: 1e-4 per window) and acc / acc_norm / acc_bytes / acc_stderr
and the three perplexity metrics agree. lm-eval missing is a failure, not a skip."""
import json
import math
import os
import subprocess
import sys

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
import transformers
import yaml

import lm_eval  # a missing peer fails here, loudly
from lm_eval.tasks import TaskManager

from tiny_runs import QFORGE, ROOT, kjv_corpus, tiny_recipe, train

TOL = 1e-4
CTX = 64
MAKE = os.path.join(ROOT, "scripts", "make_cloze_task.py")


def _kjv_lines(a, b):
    with open(os.path.join(ROOT, "data/corpora/kjv.txt"), encoding="utf-8") as f:
        return f.read().split("\n")[a:b]


def _q(*args):
    return subprocess.run([QFORGE, *map(str, args)], capture_output=True,
                          env=dict(os.environ, OMP_NUM_THREADS="2", QFORGE_PROGRESS="0"))


def _write_jsonl(path, docs):
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """The task files and lm-eval YAMLs: {name: (jsonl, extra qforge args)} and the YAML dir."""
    d = tmp_path_factory.mktemp("tasks")
    held_out = d / "held_out.txt"
    held_out.write_text("\n".join(_kjv_lines(30000, 30400)) + "\n", encoding="utf-8")
    cloze = d / "cloze.jsonl"
    subprocess.run([sys.executable, MAKE, held_out, "--n", "40", "--choices", "4", "--seed", "7", "--out", cloze],
                   check=True, capture_output=True)
    docs = [json.loads(l) for l in cloze.read_text(encoding="utf-8").splitlines()]
    docs += [  # characters vs bytes, trailing whitespace in the query, an empty query
        {"query": "And the LORD said unto Moses, ", "choices": ["Go in unto Pharaoh", "naïve café über alles", "ÆØÅ ñ"],
         "gold": 0},
        {"query": "Blessed are the meek:\u00a0", "choices": ["for they shall inherit the earth", "☃☃☃ ☃", "日本語です"],
         "gold": 0},
        {"query": "", "choices": ["In the beginning", "xyzzy plugh", "the the the"], "gold": 0},
    ]
    # A non-ASCII choice (few characters, many bytes) against unlikely ASCII: the per-character and
    # per-byte normalisations pick different choices here (acc_norm != acc_bytes), on both models.
    odd = ["~^", "`{@", "#$%^", "~`^{@", "zq~^", "@#", "{`~", "^%$#@"]
    for i, v in enumerate(_kjv_lines(30500, 30508)):
        docs.append({"query": " ".join(v.split()[:6]), "choices": [["日本語です", "ÆØÅñé", "☃☃", "日本"][i % 4], odd[i]],
                     "gold": 1})
    _write_jsonl(cloze, docs)

    # MMLU-shaped: which word comes next in a verse.
    lines = [l.split() for l in _kjv_lines(29000, 29200) if len(l.split()) >= 12]

    def mmlu_doc(i, ws):
        k = 4 + i % 5
        opts = [ws[k], lines[(i + 7) % len(lines)][k], lines[(i + 13) % len(lines)][k + 1],
                lines[(i + 29) % len(lines)][k + 2]]
        ans = i % 4
        opts[0], opts[ans] = opts[ans], opts[0]
        return {"question": f"  Which word comes next: \"{' '.join(ws[:k])}\"?\n", "choices": opts, "answer": ans,
                "subject": "bible_verses"}

    mmlu = _write_jsonl(d / "mmlu.jsonl", [mmlu_doc(i, ws) for i, ws in enumerate(lines[:16])])
    mmlu_dev = _write_jsonl(d / "mmlu_dev.jsonl", [mmlu_doc(i, ws) for i, ws in enumerate(lines[40:43], 40)])

    verses = _kjv_lines(28000, 28400)
    rolling = _write_jsonl(d / "rolling.jsonl", [
        {"text": "\n".join(verses[0:12])},           # several windows
        {"text": "Jesus wept."},                      # one window
        {"text": ""},                                 # no tokens (no-BOS tokenizer: no window)
        {"text": "  \u3000Leading and trailing whitespace, caf\u00e9 \u00a0 na\u00efve\t\n"},
        {"text": "\n\n".join(verses[20:45])},         # many windows
    ])

    def yml(name, **kw):
        base = {"task": name, "dataset_path": "json", "test_split": "test"}
        (d / f"{name}.yaml").write_text(yaml.safe_dump({**base, **kw}, allow_unicode=True), encoding="utf-8")

    mc = {"output_type": "multiple_choice", "doc_to_text": "query", "doc_to_choice": "choices", "doc_to_target": "gold",
          "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}, {"metric": "acc_bytes"}]}
    yml("qf_cloze", dataset_kwargs={"data_files": {"test": str(cloze)}}, **mc)
    yml("qf_cloze_1shot", dataset_kwargs={"data_files": {"test": str(cloze)}}, **mc, num_fewshot=1,
        fewshot_split="test", fewshot_config={"sampler": "first_n"})
    yml("qf_mmlu", dataset_kwargs={"data_files": {"test": str(mmlu), "dev": str(mmlu_dev)}},
        output_type="multiple_choice", fewshot_split="dev", fewshot_config={"sampler": "first_n"}, num_fewshot=2,
        doc_to_text="{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
        doc_to_choice=["A", "B", "C", "D"], doc_to_target="answer",
        description="The following are multiple choice questions (with answers) about {{subject.replace('_', ' ')}}.\n\n",
        metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}])
    yml("qf_rolling", dataset_kwargs={"data_files": {"test": str(rolling)}}, output_type="loglikelihood_rolling",
        doc_to_text="", doc_to_target="text",
        metric_list=[{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}])
    return d, {"qf_cloze": (cloze, []), "qf_cloze_1shot": (cloze, ["--num-fewshot", 1]),
               "qf_mmlu": (mmlu, ["--num-fewshot", 2, "--fewshot-from", mmlu_dev]), "qf_rolling": (rolling, [])}


def _bpe_llama(d):
    """A transformers Llama + byte-level BPE tokenizer.json that adds no BOS (as in test_hf_dirs.py)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    corpus = kjv_corpus(d / "corpus.txt", 1500)
    text = d / "mixed.txt"
    text.write_text(corpus.read_text(encoding="utf-8") + "\n" + "naïve café über ÆØÅ ñ ☃ 日本語です\n" * 30, encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(text)], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|eos|>", "<|bos|>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                               show_progress=False))
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=CTX, bos_token_id=1, eos_token_id=0)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = d / "bpe_llama"
    m.save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|bos|>", "eos_token": "<|eos|>",
                                                           "tokenizer_class": "PreTrainedTokenizerFast"}))
    return out


def _qforge_run(d):
    """A qforge-trained tiny Llama (sentencepiece, BOS added) and its `export --format hf` dir."""
    cfg = tiny_recipe(d, "run", tie=False, max_steps=60)
    train(cfg, f"model.max_seq_len={CTX}")
    out = d / "run_hf"
    r = _q("export", d / "run", "--format", "hf", "--out", out, "--dtype", "fp32")
    assert r.returncode == 0, r.stderr[-2000:]
    return d / "run", out


@pytest.fixture(scope="module", params=["bpe_llama", "qforge_run"])
def model(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    if request.param == "bpe_llama":
        return None, _bpe_llama(d)
    return _qforge_run(d)


def _lm_eval(hf_dir, task_dir, names):
    tm = TaskManager(include_path=str(task_dir))
    res = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32"}, tasks=names,
        batch_size=4, device="cpu", log_samples=True, task_manager=tm)
    return res


def _qforge(model_dir, jsonl, extra, out):
    r = _q("eval", model_dir, "--task", jsonl, "--samples-out", out, *extra)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    metrics = json.loads(r.stdout.decode().strip().splitlines()[-1])
    samples = [json.loads(l) for l in out.read_text().splitlines()]
    return metrics, samples


def test_scores_match_lm_eval(tasks, model, tmp_path):
    task_dir, files = tasks
    run_dir, hf_dir = model
    names = sorted(files)
    ref = _lm_eval(hf_dir, task_dir, names)

    def docs_of(name):  # each document's choices as lm-eval scores them (doc_to_choice)
        docs = [json.loads(l) for l in files[name][0].read_text(encoding="utf-8").splitlines()]
        return [["A", "B", "C", "D"] if "question" in d else d["choices"] for d in docs]

    report = []
    for name in names:
        jsonl, extra = files[name]
        got, samples = _qforge(hf_dir, jsonl, extra, tmp_path / f"{name}.samples.jsonl")
        want = ref["results"][name]
        ref_samples = sorted(ref["samples"][name], key=lambda s: s["doc_id"])
        assert len(samples) == len(ref_samples) == got["docs"]
        diffs, raw, margins = [], [], []
        if name == "qf_rolling":
            for s, r in zip(samples, ref_samples):
                ll = r["filtered_resps"][0]
                ll = ll[0] if isinstance(ll, (list, tuple)) else ll
                # a document's log-likelihood is the sum of its windows' (lm-eval's requests): 1e-4 each
                diffs.append(abs(s["loglikelihood"] - float(ll)) / max(1, s["windows"]))
                raw.append(abs(s["loglikelihood"] - float(ll)))
            for k in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
                assert got[k] == pytest.approx(want[f"{k},none"], rel=1e-6, abs=0), (name, k)
        else:
            for s, r in zip(samples, ref_samples):
                lls = [float(x[0]) for x in r["filtered_resps"]]
                greedy = [bool(x[1]) for x in r["filtered_resps"]]
                assert len(lls) == len(s["loglikelihoods"])
                diffs += [abs(a - b) for a, b in zip(s["loglikelihoods"], lls)]
                assert s["is_greedy"] == greedy, (name, s["doc"])
                # No near-tie in the fixture: a prediction could flip on agreement within TOL alone.
                lens = [(len(c), len(c.encode("utf-8"))) for c in docs_of(name)[s["doc"]]]
                for score in (lls, [x / n for x, (n, _) in zip(lls, lens)], [x / b for x, (_, b) in zip(lls, lens)]):
                    top = sorted(score, reverse=True)
                    margins.append(top[0] - top[1])
                assert s["acc"] == r["acc"] and s["acc_norm"] == r["acc_norm"], (name, s["doc"])
                if "acc_bytes" in r:
                    assert s["acc_bytes"] == r["acc_bytes"], (name, s["doc"])
            if name == "qf_cloze":  # lm-eval's acc_norm divides by characters, acc_bytes by bytes: not conflated
                assert any(r["acc_norm"] != r["acc_bytes"] for r in ref_samples), "no document tells them apart"
            for k in ("acc", "acc_norm") + (("acc_bytes",) if name != "qf_mmlu" else ()):
                assert got[k] == pytest.approx(want[f"{k},none"], abs=1e-12), (name, k)
            for k in ("acc", "acc_norm"):
                assert got[f"{k}_stderr"] == pytest.approx(want[f"{k}_stderr,none"], rel=1e-9), (name, k)
        assert max(diffs) <= TOL, (name, max(diffs))
        assert not margins or min(margins) > 10 * TOL, (name, min(margins))
        report.append(f"{name}: {len(diffs)} log-likelihoods, max |qforge - lm-eval| = {max(raw or diffs):.3g}"
                      + (f" (per window {max(diffs):.3g})" if raw else f", smallest top-2 margin {min(margins):.3g}"))
        report[-1] += "; " + ", ".join(f"{k} {v:.4g}" for k, v in got.items() if isinstance(v, float))
    print("\n" + "\n".join(report))
    if run_dir is not None:  # the run dir itself scores as its HF export does
        got, samples = _qforge(run_dir, files["qf_rolling"][0], [], tmp_path / "run.samples.jsonl")
        _, hf_samples = _qforge(hf_dir, files["qf_rolling"][0], [], tmp_path / "hf.samples.jsonl")
        for a, b in zip(samples, hf_samples):
            assert a["loglikelihood"] == pytest.approx(b["loglikelihood"], abs=1e-4)


def test_cloze_generator_is_deterministic_and_truthful(tmp_path):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n".join(_kjv_lines(30000, 30400)) + "\n", encoding="utf-8")

    def make(out, seed, *more):
        subprocess.run([sys.executable, MAKE, held_out, "--n", "60", "--seed", str(seed), "--out", out, *more],
                       check=True, capture_output=True)
        return out.read_bytes()

    a, b, c = make(tmp_path / "a.jsonl", 3), make(tmp_path / "b.jsonl", 3), make(tmp_path / "c.jsonl", 4)
    assert a == b and a != c
    lines = held_out.read_text(encoding="utf-8").split("\n")
    golds = [0] * 4
    for l in a.decode().splitlines():
        d = json.loads(l)
        assert len(d["choices"]) == 4 and len(set(d["choices"])) == 4
        words = lines[int(d["source"].rsplit(":", 1)[1]) - 1].split()
        truth = d["choices"][d["gold"]]
        # the true continuation follows the query in its own line; the distractors do not
        assert " ".join(words).startswith(d["query"] + " " + truth)
        assert all(len(x.split()) == len(truth.split()) for x in d["choices"])
        golds[d["gold"]] += 1
    assert min(golds) >= 5, golds  # the answer's position is spread, not fixed
    r = subprocess.run([sys.executable, MAKE, held_out, "--n", "100000", "--out", tmp_path / "x.jsonl"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "only" in r.stderr and not (tmp_path / "x.jsonl").exists()
