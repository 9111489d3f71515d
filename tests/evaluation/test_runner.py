"""The evaluation runner against independent references: cn_clip's own zero-shot preprocessing and
scoring (same weights, through our conversion), the trainer's Evaluator, clean copies of sets
with bad images (run from scratch), and hand-written expectations for the hardening cases."""

import base64
import json
import sys
import types

import numpy as np
import PIL.Image
import pytest
from _makers import REPO, jpeg, png
from _train_helpers import random_params, tiny_config

import chinese_clip_jax as ccj
from chinese_clip_jax import evaluation
from chinese_clip_jax.evaluation import cli

RES = 32
CLASSES = ["猫", "狗", "汽车"]
TEMPLATES = ["一张{}的照片。", "{}"]


def _model_config():
    """A tiny ViT whose vision MLP is 4x its width, as cn_clip's VisualTransformer has it."""
    d = tiny_config(
        vocab_size=21128, hidden=32, heads=2, max_positions=64, image_size=RES, patch_size=16, projection_dim=16
    ).to_dict()
    d["vision_config"]["intermediate_size"] = 4 * 32
    return ccj.ChineseCLIPConfig.from_dict(d)


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """(config, params, a loaded ChineseCLIP, its checkpoint directory)."""
    cfg = _model_config()
    params = random_params(cfg, seed=3)
    d = tmp_path_factory.mktemp("model")
    ccj.save_pretrained(d, cfg, params)
    clip = ccj.ChineseCLIP(ccj.ChineseCLIPModel(cfg), params, text_batch_size=8, image_batch_size=8)
    return cfg, params, clip, str(d)


def _folder(root, rng, per_class=4):
    """root/<class>/<i>.png with mixed aspect ratios (crop and squash then differ)."""
    for c, name in enumerate(["a", "b", "c"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i}.png").write_bytes(png(rng, 20 + 9 * i, 48 - 5 * c))
    return root


# ----------------------------------------------------------------------------- cn_clip's protocol


def _cn_clip_modules(monkeypatch):
    """cn_clip's model, eval transform and zero-shot scoring. torchvision and timm do not import
    here: the few torchvision transforms cn_clip's ``image_transform`` composes are given their
    documented PIL semantics (Resize of a (h, w) size = PIL resize with that filter; ToTensor =
    CHW / 255; Normalize = (x - mean) / std), and set in cn_clip's module, whoever imported it."""
    import torch

    class Compose:
        def __init__(self, fns):
            self.fns = fns

        def __call__(self, x):
            for f in self.fns:
                x = f(x)
            return x

    class InterpolationMode:
        BICUBIC = PIL.Image.Resampling.BICUBIC

    class Resize:
        def __init__(self, size, interpolation):
            self.size, self.interpolation = size, interpolation

        def __call__(self, img):
            h, w = self.size
            return img.resize((w, h), resample=self.interpolation)

    class ToTensor:
        def __call__(self, img):
            return torch.from_numpy(np.asarray(img, np.float32).transpose(2, 0, 1) / 255.0)

    class Normalize:
        def __init__(self, mean, std):
            self.mean = torch.tensor(mean).view(3, 1, 1)
            self.std = torch.tensor(std).view(3, 1, 1)

        def __call__(self, x):
            return (x - self.mean) / self.std

    working = dict(
        Compose=Compose, Resize=Resize, ToTensor=ToTensor, Normalize=Normalize, InterpolationMode=InterpolationMode
    )
    if "torchvision" not in sys.modules:
        tv = types.ModuleType("torchvision")
        tv.transforms = types.ModuleType("torchvision.transforms")
        tv.datasets = types.ModuleType("torchvision.datasets")
        for name in ("CenterCrop", "RandomResizedCrop", *working):
            setattr(tv.transforms, name, working.get(name, object))
        for name, mod in (("", tv), (".transforms", tv.transforms), (".datasets", tv.datasets)):
            monkeypatch.setitem(sys.modules, "torchvision" + name, mod)
    if "timm" not in sys.modules:  # cn_clip.training.data imports timm.data.create_transform (training only)
        timm = types.ModuleType("timm")
        timm.data = types.ModuleType("timm.data")
        timm.data.create_transform = object
        monkeypatch.setitem(sys.modules, "timm", timm)
        monkeypatch.setitem(sys.modules, "timm.data", timm.data)
    if not hasattr(sys.modules.get("torchvision.datasets"), "ImageFolder"):
        monkeypatch.setattr(
            sys.modules["torchvision"], "datasets", types.ModuleType("torchvision.datasets"), raising=False
        )
        monkeypatch.setitem(sys.modules, "torchvision.datasets", sys.modules["torchvision"].datasets)
    from cn_clip.clip import model as cn_model
    from cn_clip.clip import utils as cn_utils
    from cn_clip.eval import zeroshot_evaluation as cn_zs

    for name, value in working.items():
        monkeypatch.setattr(cn_utils, name, value)
    return cn_model, cn_utils, cn_zs


def test_zero_shot_at_the_defaults_gives_cn_clips_own_top1(saved_tiny, tmp_path, monkeypatch):
    import torch

    cn_model, cn_utils, cn_zs = _cn_clip_modules(monkeypatch)
    cfg, params, clip, _ = saved_tiny
    from chinese_clip_jax.conversion.cn_clip_pt import to_cn_clip_state_dict

    ref = cn_model.CLIP(
        embed_dim=16,
        image_resolution=RES,
        vision_layers=2,
        vision_width=32,
        vision_patch_size=16,
        vocab_size=21128,
        text_attention_probs_dropout_prob=0.0,
        text_hidden_act="gelu",
        text_hidden_dropout_prob=0.0,
        text_hidden_size=32,
        text_initializer_range=0.02,
        text_intermediate_size=64,
        text_max_position_embeddings=64,
        text_num_attention_heads=2,
        text_num_hidden_layers=2,
        text_type_vocab_size=2,
        vision_head_width=16,
    ).eval()
    state = {k: torch.from_numpy(v) for k, v in to_cn_clip_state_dict(params, cfg).items()}
    ref.load_state_dict(state, strict=True)

    rng = np.random.default_rng(5)
    root = tmp_path / "set"
    paths, labels = [], []
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(6):
            p = root / name / f"{i}.jpg"
            p.write_bytes(jpeg(rng, 24 + 11 * i, 60 - 13 * c))
            paths.append(p)
            labels.append(c)
    # cn_clip: ImageFolder's loader (RGB), its eval transform, its classifier and its scoring
    transform = cn_utils.image_transform(RES)
    pixels = torch.stack([transform(PIL.Image.open(p).convert("RGB")) for p in paths])
    args = types.SimpleNamespace(context_length=52, gpu="cpu")
    classifier = cn_zs.zero_shot_classifier(ref, CLASSES, [lambda c: f"一张{c}的照片。", lambda c: c], args)

    # cn_clip's accuracy() calls float() on a 1-element array, which numpy 2 refuses: the same
    # count with .item(), so that cn_clip's run() (normalise, 100x softmax, top-1 / n) runs as is
    def accuracy(output, target, topk=(1,)):
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum().item() for k in topk]

    monkeypatch.setattr(cn_zs, "accuracy", accuracy)
    top1, logits = cn_zs.run(ref, classifier, [(pixels, torch.tensor(labels))], args)

    res = evaluation.zero_shot(clip, f"folder:{root}", templates=TEMPLATES, batch_size=8, progress=False)
    assert res.settings["resize_mode"] == "squash" and res.counts["images"] == 18
    assert res.metrics["top1"] == pytest.approx(top1, abs=1e-12)
    # the whole ranking, not just a fraction: every image's top-1 class is cn_clip's
    ours = evaluation.runner.zero_shot_scores(
        clip.encoder,
        [str(p) for p in paths],
        labels,
        [[t.replace("{}", n) for t in TEMPLATES] for n in CLASSES],
        tokenize=clip.processor.tokenize,
        preprocess=evaluation.api._preprocess(clip, "squash"),
        batch_size=8,
    )
    np.testing.assert_array_equal(ours.predictions, logits.argmax(dim=1).numpy())
    # crop (the transformers processor) sees other pixels: the default is what makes them agree
    with torch.no_grad():
        feats = ref(pixels, None)
    cn_image = (feats / feats.norm(dim=-1, keepdim=True)).numpy()
    squash = clip.encoder.encode_pixels(
        evaluation.api._preprocess(clip, "squash")([str(p) for p in paths], 0), batch_size=8
    )
    crop = clip.encoder.encode_pixels(
        evaluation.api._preprocess(clip, "crop")([str(p) for p in paths], 0), batch_size=8
    )
    np.testing.assert_allclose(squash, cn_image, atol=2e-5)
    assert np.abs(crop - cn_image).max() > 1e-2


# ----------------------------------------------------------------------------- one runner


def test_the_api_and_the_trainers_evaluator_give_identical_metrics(saved_tiny):
    from chinese_clip_jax.data.pipeline import CachingTokenizer
    from chinese_clip_jax.training.evaluator import Evaluator

    _, _, clip, _ = saved_tiny
    rng = np.random.default_rng(7)
    images = [png(rng, 20 + 3 * i, 50 - 2 * i) for i in range(10)]
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 0, 1, 2])
    templates = ["这是一张很长很长很长很长很长很长很长很长的{}的照片。", "{}"]
    captions = [f"第{t}张图片" for t in range(6)]
    positives = [[0], [1, 7], [9], [2, 3], [4], [5, 6]]
    for context_length in (12,):  # cuts the long prompt (52 would not): the trainer must use the run's length
        sets = {
            "zs": {
                "images": images,
                "labels": labels,
                "class_texts": [[t.replace("{}", n) for t in templates] for n in CLASSES],
            },
            "ret": {"images": images, **CachingTokenizer(context_length)(captions), "text_to_images": positives},
        }
        ev = Evaluator(
            clip.model,
            clip.mesh,
            clip.encoder.param_shardings,
            sets,
            chunk=8,
            resize_mode="crop",
            context_length=context_length,
        )
        got = ev(clip.params)
        processor = ccj.ChineseCLIPProcessor(
            clip.processor.tokenizer, clip.processor.image_processor.settings, context_length=context_length
        )
        api_clip = ccj.ChineseCLIP(clip.model, clip.params, processor)
        zs = evaluation.zero_shot(
            api_clip,
            evaluation.ClassificationSet(images, labels, list(CLASSES), "memory"),
            templates=templates,
            resize="crop",
            batch_size=8,
            progress=False,
        )
        assert {k: got[f"zs/{k}"] for k in ("top1", "top5")} == {k: zs.metrics[k] for k in ("top1", "top5")}
        ret = evaluation.retrieval(
            api_clip,
            evaluation.RetrievalSet(images, list(range(10)), list(range(6)), captions, positives, "memory", "memory"),
            resize="crop",
            batch_size=8,
            progress=False,
        )
        assert {k[4:]: v for k, v in got.items() if k.startswith("ret/")} == ret.metrics
        assert zs.settings["context_length"] == context_length
    assert ev._encode_fn(None)(["一"])["input_ids"].shape == (1, 12)


# ----------------------------------------------------------------------------- bad images


def test_a_truncated_a_zero_byte_and_a_missing_image_are_skipped_and_listed(saved_tiny, tmp_path, capsys):
    _, _, _, src = saved_tiny
    rng = np.random.default_rng(11)
    root = _folder(tmp_path / "set", rng)
    clean = tmp_path / "clean"
    import shutil

    shutil.copytree(root, clean)
    full = jpeg(rng, 40, 40)
    (root / "a" / "t.jpg").write_bytes(full[: len(full) // 2])  # truncated
    (root / "b" / "z.png").write_bytes(b"")  # zero bytes
    (root / "c" / "gone.png").symlink_to(tmp_path / "deleted.png")  # listed, file gone
    out = tmp_path / "r.json"
    out.write_text("old results\n")
    argv = ["zeroshot", "--model", src, "--data", f"folder:{root}", "--templates", str(_templates(tmp_path))]
    code = cli.main([*argv, "--output", str(out), "--overwrite", "--batch-size", "8", "--per-class"])
    err = capsys.readouterr().err
    assert code == 0, err
    res = json.loads(out.read_text(encoding="utf-8"))
    listed = {b["image"]: b["reason"] for b in res["bad_images"]}
    assert set(listed) == {str(root / "a" / "t.jpg"), str(root / "b" / "z.png"), str(root / "c" / "gone.png")}
    assert "truncated" in listed[str(root / "a" / "t.jpg")]
    assert "No such file" in listed[str(root / "c" / "gone.png")]
    assert res["counts"] == {"images": 15, "scored_images": 12, "bad_images": 3, "classes": 3}
    per_class = res["details"]["per_class"]
    assert [c["images"] for c in per_class] == [4, 4, 4] and np.sum(res["details"]["confusion"]) == 12
    recalls = [np.diag(res["details"]["confusion"])[c] / 4 for c in range(3)]
    assert [c["recall"] for c in per_class] == recalls
    assert res["metrics"]["mean_per_class_recall"] == pytest.approx(np.mean(recalls))
    # the same as the set without them, run from scratch (the same weights, loaded once here)
    _, _, clip, _ = saved_tiny
    ref = evaluation.zero_shot(clip, f"folder:{clean}", templates=TEMPLATES, batch_size=8, progress=False)
    assert ref.bad_images == [] and {k: res["metrics"][k] for k in ref.metrics} == ref.metrics
    # too many: an error naming the first ones
    with pytest.raises(evaluation.TooManyBadImages, match=r"more than 2 of 15 images .*t\.jpg"):
        evaluation.zero_shot(clip, f"folder:{root}", templates=TEMPLATES, batch_size=8, max_bad=2, progress=False)


def test_the_trainers_eval_set_skips_counts_names_and_caps_bad_images(saved_tiny, tmp_path, capsys):
    """A trainer eval set (data.files.eval_table) with one corrupt image follows data.bad_records:
    under data.max_bad 0 one error line naming the file; under 1 it completes, warns once per run,
    logs the count, and scores what the same set without that row scores (run from scratch)."""
    from chinese_clip_jax.data import default_data_config, eval_sets
    from chinese_clip_jax.data.bad_records import TooManyBadRecords
    from chinese_clip_jax.training.evaluator import Evaluator

    _, _, clip, _ = saved_tiny
    rng = np.random.default_rng(5)
    rows = [(f"{i}.png", f"第{i}张") for i in range(5)]
    for name, _ in rows:
        (tmp_path / name).write_bytes(png(rng, 30, 40))
    (tmp_path / "2.png").write_bytes(b"not an image at all")
    tables = {}
    for kind, kept in (("bad", rows), ("clean", [r for r in rows if r[0] != "2.png"])):
        tables[kind] = tmp_path / f"{kind}.csv"
        tables[kind].write_text("image,caption\n" + "".join(f"{n},{c}\n" for n, c in kept), encoding="utf-8")

    def evaluator(kind, max_bad):
        cfg = default_data_config("files")
        cfg.files.eval_table = str(tables[kind])
        sets = eval_sets(cfg, image_size=RES)
        return Evaluator(clip.model, clip.mesh, clip.encoder.param_shardings, sets, chunk=8, max_bad=max_bad)

    with pytest.raises(TooManyBadRecords) as e:
        evaluator("bad", 0)(clip.params)
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "2.png") in message
    assert message.startswith("more than 0 of 5 images could not be read (data.max_bad 0; 1 so far)")
    capsys.readouterr()
    ev = evaluator("bad", 1)
    got = ev(clip.params)
    assert got["retrieval/bad_images"] == 1.0 and [b.index for b in ev.bad_images["retrieval"]] == [2]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: 1 of 5 images of eval set retrieval could not be read")
    assert str(tmp_path / "2.png") in err[0]
    assert ev(clip.params) == got and capsys.readouterr().err == ""  # once per run, the count every time
    clean = evaluator("clean", 0)(clip.params)
    assert {k: v for k, v in got.items() if k != "retrieval/bad_images"} == clean


def _templates(tmp_path):
    p = tmp_path / "templates.txt"
    p.write_text("\n".join(TEMPLATES) + "\n", encoding="utf-8")
    return p


def _split(root, rng, bad: bool):
    """A cn_clip split of 8 images (ids 10..17), 6 captions. bad=True: image 11 is zero bytes, 12
    truncated, 13 bad base64; caption 3 names only 12 and 13."""
    root.mkdir()
    images = {10 + i: jpeg(rng, 30 + 3 * i, 40) for i in range(8)}
    lines = []
    for iid, b in images.items():
        text = base64.urlsafe_b64encode(b).decode()
        if bad and iid == 11:
            text = ""
        elif bad and iid == 12:
            text = base64.urlsafe_b64encode(b[: len(b) // 2]).decode()
        elif bad and iid == 13:
            text = "@@not base64@@"
        lines.append(f"{iid}\t{text}")
    (root / "valid_imgs.tsv").write_text("\n".join(lines) + "\n")
    captions = [[10, 11], [14], [15, 12], [12, 13], [16], [17, 10]]
    with open(root / "valid_texts.jsonl", "w", encoding="utf-8") as f:
        for t, ids in enumerate(captions):
            f.write(
                json.dumps({"text_id": 100 + t, "text": f"一张图片{t}", "image_ids": ids}, ensure_ascii=False) + "\n"
            )
    return root


def test_retrieval_skips_bad_tsv_images_and_reports_orphaned_texts(saved_tiny, tmp_path):
    _, _, clip, _ = saved_tiny
    rng = np.random.default_rng(13)
    root = _split(tmp_path / "bad", rng, bad=True)
    res = evaluation.retrieval(clip, str(root), batch_size=4, progress=False, max_bad=3)
    bad = {b.index: b for b in res.bad_images}
    assert sorted(bad) == [1, 2, 3]
    for index, line in ((1, 2), (2, 3), (3, 4)):
        assert bad[index].image == f"image {10 + index} ({root / 'valid_imgs.tsv'}:{line})", bad[index]
    assert "Error" in bad[3].reason
    assert res.details["texts_without_images"] == [{"text_id": 103, "image_ids": [12, 13]}]
    assert res.counts["scored_texts"] == 5 and res.counts["scored_images"] == 5
    # reference: the split without the bad images and the caption that only had them, from scratch
    clean = tmp_path / "clean"
    clean.mkdir()
    tsv = [
        ln for ln in (root / "valid_imgs.tsv").read_text().splitlines() if ln.split("\t")[0] not in ("11", "12", "13")
    ]
    (clean / "valid_imgs.tsv").write_text("\n".join(tsv) + "\n")
    rows = [json.loads(ln) for ln in (root / "valid_texts.jsonl").read_text(encoding="utf-8").splitlines()]
    with open(clean / "valid_texts.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            ids = [i for i in r["image_ids"] if i not in (11, 12, 13)]
            if ids:
                f.write(json.dumps(dict(r, image_ids=ids), ensure_ascii=False) + "\n")
    ref = evaluation.retrieval(clip, str(clean), batch_size=4, progress=False)
    assert ref.metrics == res.metrics and ref.bad_images == []
    # cn_clip-comparable JSON: the flat layout result collectors read
    d = json.loads(res.to_json())
    assert {"dataset", "model", "task", "metrics"} <= set(d) and d["task"] == "zeroshot_retrieval"


# ----------------------------------------------------------------------------- hardening: inputs and outputs


def test_duplicate_labels_name_the_duplicates_and_their_lines(tmp_path, capsys):
    folder = _folder(tmp_path / "f", np.random.default_rng(0), per_class=1)
    labels = tmp_path / "labels.txt"
    labels.write_text("猫\n狗\n\n猫\n", encoding="utf-8")
    code = cli.main(["zeroshot", "--model", "nowhere", "--data", f"folder:{folder}", "--labels", str(labels)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"--labels {labels}: duplicate class names '猫' (lines 1 and 4)" in err


def test_outputs_that_hold_files_are_refused_before_any_work(tmp_path, capsys):
    folder = _folder(tmp_path / "f", np.random.default_rng(0), per_class=1)
    split = _split(tmp_path / "split", np.random.default_rng(1), bad=False)
    taken = tmp_path / "taken.json"
    taken.write_text("keep me")
    feats = tmp_path / "feats"
    feats.mkdir()
    (feats / "image_features.npy").write_bytes(b"keep")
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    zs = ["zeroshot", "--model", "nowhere", "--data", f"folder:{folder}"]
    ret = ["retrieval", "--model", "nowhere", "--data", str(split)]
    cases = [
        ([*zs, "--output", str(taken)], f"--output {taken}: already exists; pass --overwrite"),
        ([*ret, "--predictions", str(taken)], f"--predictions {taken}: already exists; pass --overwrite"),
        ([*ret, "--features-dir", str(feats)], f"--features-dir {feats}: the directory already holds files"),
        ([*zs, "--output", str(outdir)], f"--output {outdir}: is a directory"),
        ([*zs, "--output", str(outdir), "--overwrite"], f"--output {outdir}: is a directory"),
    ]
    for argv, named in cases:
        code = cli.main(argv)
        captured = capsys.readouterr()
        assert code == 2 and captured.out == "", (argv, captured.err)
        assert captured.err.count("\n") == 1 and captured.err.startswith("error: ") and named in captured.err
    assert taken.read_text() == "keep me" and (feats / "image_features.npy").read_bytes() == b"keep"
    assert list(outdir.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["f", "split", "taken.json", "feats", "outdir"]
    )


def test_gbk_files_name_the_file_line_and_encoding_and_read_with_encoding(tmp_path, capsys):
    folder = _folder(tmp_path / "f", np.random.default_rng(0), per_class=1)
    labels = tmp_path / "labels.txt"
    labels.write_bytes("猫\n狗\n汽车\n".encode("gbk"))
    templates = tmp_path / "t.txt"
    templates.write_bytes("{}\n一张{}的照片。\n".encode("gbk"))
    split = _split(tmp_path / "split", np.random.default_rng(1), bad=False)
    rows = (split / "valid_texts.jsonl").read_text(encoding="utf-8")
    (split / "valid_texts.jsonl").write_bytes(rows.encode("gbk"))
    zs = ["zeroshot", "--model", "nowhere", "--data", f"folder:{folder}"]
    cases = [
        # 猫 in GBK (c3 a8) happens to be valid UTF-8 (è): line 2 (狗) is the first that cannot decode
        ([*zs, "--labels", str(labels)], f"--labels {labels}:2: not valid utf-8 text"),
        ([*zs, "--templates", str(templates)], f"--templates {templates}:2: not valid utf-8 text"),
        (
            ["retrieval", "--model", "nowhere", "--data", str(split)],
            f"{split / 'valid_texts.jsonl'}:1: not valid utf-8 text",
        ),
    ]
    for argv, named in cases:
        code = cli.main(argv)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and named in err and "--encoding gbk" in err, err
    assert evaluation.read_labels(str(labels), encoding="gbk")[0] == ["猫", "狗", "汽车"]
    assert evaluation.read_templates(str(templates), encoding="gbk")[0] == ["{}", "一张{}的照片。"]
    assert evaluation.open_retrieval(split, encoding="gbk").texts == [f"一张图片{t}" for t in range(6)]
    code = cli.main([*zs, "--labels", str(labels), "--encoding", "gbk", "--model", "nowhere"])
    assert code == 2 and "nowhere" in capsys.readouterr().err  # read fine; it got as far as the model


def test_module_form_help_has_an_example_per_task_and_bars_stay_out_of_logs():
    import subprocess

    env = dict(__import__("os").environ)
    for task in ("zeroshot", "retrieval"):
        proc = subprocess.run(
            [sys.executable, "-m", "chinese_clip_jax.evaluation", task, "--help"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert proc.returncode == 0 and f"ccj-eval {task} --model" in proc.stdout, proc.stderr
        assert "--data" in proc.stdout and "squash" in proc.stdout
    # stderr is not a terminal here: no progress bar (no carriage-return redraws in a log)
    assert evaluation.api._progress(None) is False and evaluation.api._progress(True) is True


def test_the_python_api_example_in_the_docs_runs(tmp_path, monkeypatch, capsys):
    import pathlib
    import re

    doc = (pathlib.Path(REPO) / "docs" / "evaluation.md").read_text(encoding="utf-8")
    code = re.search(r"<!-- example: python-api -->\n```python\n(.*?)```", doc, re.S).group(1)
    assert 10 <= len(code.strip().splitlines()) <= 30
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/evaluation.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    res = json.loads("\n".join(out[1:]))
    assert res["task"] == "zeroshot_classification" and res["counts"]["images"] == 6
    assert res["settings"]["resize_mode"] == "squash" and out[0].endswith("squash")
    assert res["metrics"]["top1"] in {k / 6 for k in range(7)}
