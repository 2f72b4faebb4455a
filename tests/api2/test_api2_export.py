"""Export (Neuronpedia-compatible JSONL batches, zip or JSON lines) and ``kronscope import``:
round trips restore explanations (with history), features and activations; Neuronpedia's
own layout imports; malformed files and files of another SAE are refused with nothing
written."""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from kronscope.cli import app as cli_app
from kronscope.db.models import Explanation, Harvest, Sae, UnitKind
from kronscope.db.repositories import examples as example_repo
from kronscope.db.repositories import explanations as expl_repo
from kronscope.db.repositories import stats as stats_repo
from kronscope.services.export import ImportFailed, import_file

from .conftest import HOOK, MODEL, Api

EXPORT = "/api/v1/saes/{}/export"


@pytest.fixture
def world(make_api: Any) -> Api:
    """tiny-kron harvested and explained (an edited human text, a parent, an LLM text and a
    deleted one); tiny-kron-2 (same shape, other weights) and tiny-topk as targets."""
    api: Api = make_api(register=("tiny-kron", "tiny-topk"))
    api.register("tiny-kron-2")
    api.harvest("tiny-kron", seed=3)
    h = api.headers
    url = "/api/v1/saes/tiny-kron/latents/{}/explanations"
    e3 = api.client.post(url.format(3), json={"text": "first words"}, headers=h).json()
    api.client.put(url.format(3) + f"/{e3['id']}", json={"text": "fires on foxes"}, headers=h)
    api.client.post(url.format(3), json={"text": "a second opinion", "score": 0.25}, headers=h)
    gone = api.client.post(url.format(9), json={"text": "deleted text"}, headers=h).json()
    api.client.delete(url.format(9) + f"/{gone['id']}", headers=h)
    r = api.client.post(
        "/api/v1/saes/tiny-kron/parents/base/1/0/explanations",
        json={"text": "base: nouns"},
        headers=h,
    )
    assert r.status_code == 201
    with api.sessions() as s:
        sae = s.scalar(sa.select(Sae).where(Sae.slug == "tiny-kron"))
        assert sae is not None
        expl_repo.create_explanation(
            s,
            sae.id,
            0,
            40,
            "numbers <and> “quotes” 🦊",
            source="llm:gpt-x",
            author="bot",
            score=0.7,
        )
        s.commit()
    return api


def explanations(api: Api, slug: str) -> list[tuple[Any, ...]]:
    with api.sessions() as s:
        sae = s.scalar(sa.select(Sae).where(Sae.slug == slug))
        assert sae is not None
        rows = s.scalars(
            sa.select(Explanation)
            .where(Explanation.sae_id == sae.id, Explanation.deleted_at.is_(None))
            .order_by(Explanation.unit_kind, Explanation.unit_index, Explanation.text)
        ).all()
        return [
            (
                e.unit_kind,
                e.unit_index,
                e.text,
                e.source,
                e.author,
                e.score,
                [(r.text, r.author, r.source) for r in expl_repo.explanation_history(s, e.id)],
            )
            for e in rows
        ]


def harvest_view(api: Api, slug: str) -> dict[str, Any]:
    with api.sessions() as s:
        sae = s.scalar(sa.select(Sae).where(Sae.slug == slug))
        assert sae is not None and sae.active_harvest_id is not None
        out: dict[str, Any] = {}
        for kind, count in (
            (UnitKind.LATENT, sae.d_sae),
            (UnitKind.BASE, 16),
            (UnitKind.EXTENSION, 32),
        ):
            stats = stats_repo.stats_for_units(s, sae, kind, range(count))
            out[f"stats-{kind}"] = {
                i: (
                    st.n_active,
                    st.frequency,
                    round(st.max_value, 3),
                    st.histogram,
                    st.histogram_edges,
                )
                for i, st in stats.items()
            }
            for i in (0, 5, count - 1):
                top = example_repo.top_examples(s, sae, kind, i)
                samples = example_repo.sampled_examples(s, sae, kind, i)
                out[f"ex-{kind}-{i}"] = [
                    (
                        e.kind,
                        e.rank,
                        e.tokens,
                        e.values.tolist(),
                        e.max_pos,
                        e.sample_pos,
                        e.sample_value,
                    )
                    for e in top + samples
                ]
        return out


def test_zip_export_is_neuronpedia_shaped_and_round_trips(world: Api, tmp_path: Path) -> None:
    api = world
    r = api.client.get(EXPORT.format("tiny-kron"))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    assert 'filename="tiny-kron-export.zip"' in r.headers["content-disposition"]
    zf = zipfile.ZipFile(io.BytesIO(r.content))
    names = set(zf.namelist())
    root = f"{MODEL}/tiny-kron/"
    for name in ("kronscope.json", "model.jsonl", "source.jsonl", "features/batch-0.jsonl",
                 "explanations/batch-0.jsonl", "activations/batch-0.jsonl",
                 "kronscope-parents/base/features/batch-0.jsonl",
                 "kronscope-parents/extension/activations/batch-0.jsonl",
                 "kronscope-parents/base/explanations/batch-0.jsonl"):  # fmt: skip
        assert root + name in names, name
    meta = json.loads(zf.read(root + "kronscope.json"))
    assert (meta["d_sae"], meta["model_id"], meta["hook_name"], meta["h"]) == (64, MODEL, HOOK, 8)
    features = [json.loads(line) for line in zf.read(root + "features/batch-0.jsonl").splitlines()]
    assert len(features) == 64
    f0 = features[0]
    for key in ("modelId", "layer", "index", "maxActApprox", "frac_nonzero", "freq_hist_data_bar_heights",
                "freq_hist_data_bar_values", "pos_str", "neg_str", "topkCosSimIndices", "hookName"):  # fmt: skip
        assert key in f0, key
    assert f0["index"] == "0" and f0["modelId"] == MODEL and f0["layer"] == "tiny-kron"
    acts = [json.loads(line) for line in zf.read(root + "activations/batch-0.jsonl").splitlines()]
    a0 = acts[0]
    assert len(a0["tokens"]) == len(a0["values"]) and a0["maxValue"] == max(a0["values"])
    assert {a["kronscope"]["example"] for a in acts} == {"top", "sample"}
    expl = [json.loads(line) for line in zf.read(root + "explanations/batch-0.jsonl").splitlines()]
    assert {e["description"] for e in expl} == {
        "fires on foxes",
        "a second opinion",
        "numbers <and> “quotes” 🦊",
    }
    llm = next(e for e in expl if e["kronscope"]["source"] == "llm:gpt-x")
    assert llm["explanationModelName"] == "gpt-x" and llm["authorId"] == "bot"

    path = tmp_path / "export.zip"
    path.write_bytes(r.content)
    result = import_file(api.sessions, "tiny-kron-2", path)
    assert result.format == "kronscope" and result.harvest_id is not None
    assert (result.explanations, result.features, result.explanations_skipped) == (
        4,
        64 + 16 + 32,
        0,
    )
    assert explanations(api, "tiny-kron-2") == explanations(api, "tiny-kron")
    assert len(explanations(api, "tiny-kron")) == 4
    assert harvest_view(api, "tiny-kron-2") == harvest_view(api, "tiny-kron")
    # the imported harvest serves pages like any other
    page = api.client.get("/api/v1/saes/tiny-kron-2/latents/3").json()
    assert page["harvest_status"] == "complete" and page["top_examples"]
    assert [e["text"] for e in page["explanations"]][:1] == ["a second opinion"]  # scored first
    # importing again duplicates nothing but the harvest
    again = import_file(api.sessions, "tiny-kron-2", path, harvest=False)
    assert (again.explanations, again.explanations_skipped, again.harvest_id) == (0, 4, None)
    assert explanations(api, "tiny-kron-2") == explanations(api, "tiny-kron")


def test_jsonl_export_and_cli_import(world: Api, tmp_path: Path) -> None:
    api = world
    r = api.client.get(
        EXPORT.format("tiny-kron"), params={"format": "jsonl", "sections": "explanations"}
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert lines[0]["type"] == "sae" and lines[0]["d_sae"] == 64
    assert {line["type"] for line in lines[1:]} == {"explanation"}
    assert len(lines) == 1 + 4  # three latents' explanations and the parent's
    path = tmp_path / "tiny-kron.jsonl"
    path.write_text(r.text)
    url = api.engine_db.url.render_as_string(hide_password=False)
    out = CliRunner().invoke(cli_app, ["import", str(path), "--sae", "tiny-kron-2", "--url", url])
    assert out.exit_code == 0, out.output
    assert "imported 4 explanations" in out.output
    assert explanations(api, "tiny-kron-2") == explanations(api, "tiny-kron")
    with api.sessions() as s:
        assert s.scalar(sa.select(Sae.active_harvest_id).where(Sae.slug == "tiny-kron-2")) is None


def _write_jsonl(path: Path, records: list[dict[str, Any]], *, gz: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(data) if gz else data)


def neuronpedia_folder(root: Path, *, model: str = MODEL, hook: str = HOOK, index: int = 5) -> Path:
    """A source folder as Neuronpedia's exporter writes it (gzipped batches)."""
    src = root / model / "1-res-np"
    base = {"modelId": model, "layer": "1-res-np"}
    _write_jsonl(src / "features" / "batch-0.jsonl.gz", [
        {**base, "index": str(index), "maxActApprox": 3.0, "frac_nonzero": 0.01, "hookName": hook,
         "freq_hist_data_bar_heights": [4, 2, 1], "freq_hist_data_bar_values": [0.5, 1.5, 2.5],
         "pos_str": [" the", " a"], "pos_values": [0.9, 0.5], "neg_str": [" not"], "neg_values": [-0.7],
         "topkCosSimIndices": [7, 9], "topkCosSimValues": [0.8, 0.6], "creatorId": "x"},
    ], gz=True)  # fmt: skip
    _write_jsonl(src / "explanations" / "batch-0.jsonl.gz", [
        {**base, "id": "clx1", "index": str(index), "description": "the definite article",
         "authorId": "cuid123", "typeName": "oai_token-act-pair", "explanationModelName": "gpt-4o-mini"},
        {**base, "id": "clx2", "index": "7", "description": "a person wrote this", "authorId": "cuid9",
         "typeName": None, "explanationModelName": None},
    ], gz=True)  # fmt: skip
    _write_jsonl(src / "activations" / "batch-0.jsonl.gz", [
        {**base, "id": "a1", "index": str(index), "tokens": [" in", " the", " box"], "values": [0, 1.0, 0.25],
         "maxValue": 1.0, "minValue": 0, "maxValueTokenIndex": 1, "binMin": -1, "binMax": -1},
        {**base, "id": "a2", "index": str(index), "tokens": [" on", " the", " mat"], "values": [0, 3.0, 0],
         "maxValue": 3.0, "minValue": 0, "maxValueTokenIndex": 1, "binMin": None, "binMax": None},
        {**base, "id": "a3", "index": str(index), "tokens": [" a", " cat"], "values": [0.5, 0.125],
         "maxValue": 0.5, "minValue": 0.125, "maxValueTokenIndex": 0, "binMin": 0.3, "binMax": 0.6},
    ], gz=True)  # fmt: skip
    _write_jsonl(src / "source.jsonl", [{"id": "1-res-np"}])
    return src


def test_neuronpedia_export_folder_imports(make_api: Any, tmp_path: Path) -> None:
    api: Api = make_api(register=("tiny-topk",))
    src = neuronpedia_folder(tmp_path / "np")
    result = import_file(api.sessions, "tiny-topk", src.parent.parent, author="importer")
    assert result.format == "neuronpedia"
    assert (result.explanations, result.features, result.activations) == (2, 1, 3)
    rows = explanations(api, "tiny-topk")
    assert [(r[1], r[2], r[3], r[4]) for r in rows] == [
        (5, "the definite article", "llm:gpt-4o-mini", "importer"),
        (7, "a person wrote this", "human", "importer"),
    ]
    page = api.client.get("/api/v1/saes/tiny-topk/latents/5", params={"intervals": 1}).json()
    assert (
        page["stats"]["density"] == pytest.approx(0.01) and page["stats"]["max_activation"] == 3.0
    )
    assert [e["tokens"] for e in page["top_examples"]] == [
        [" on", " the", " mat"],
        [" in", " the", " box"],
    ]
    assert page["top_examples"][1]["values"] == [0.0, 1.0, 0.25]
    sampled = [e for group in page["sampled_examples"] for e in group["examples"]]
    assert [e["tokens"] for e in sampled] == [[" a", " cat"]]
    assert page["logit_effects"]["top"][0] == {"token": " the", "value": 0.9}
    assert page["histogram"]["counts"] == [4, 2, 1] and page["histogram"]["edges"] == [
        0.0,
        1.0,
        2.0,
        3.0,
    ]
    assert [n["index"] for n in page["neighbours"]] == [7, 9]
    # a zip of the same folder and one single batch file import too
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(src.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(tmp_path / "np").as_posix())
    (tmp_path / "np.zip").write_bytes(buf.getvalue())
    assert (
        import_file(api.sessions, "tiny-topk", tmp_path / "np.zip", dry_run=True).explanations == 2
    )
    single = import_file(api.sessions, "tiny-topk", src / "explanations" / "batch-0.jsonl.gz")
    assert (single.explanations, single.explanations_skipped) == (0, 2)


def _counts(api: Api) -> tuple[int, int]:
    with api.sessions() as s:
        return (
            s.scalar(sa.select(sa.func.count()).select_from(Explanation)) or 0,
            s.scalar(sa.select(sa.func.count()).select_from(Harvest)) or 0,
        )


def test_malformed_or_foreign_files_write_nothing(world: Api, tmp_path: Path) -> None:
    api = world
    before = _counts(api)
    export = tmp_path / "kron.zip"
    export.write_bytes(api.client.get(EXPORT.format("tiny-kron")).content)

    def refused(path: Path, slug: str, match: str, **kw: Any) -> None:
        with pytest.raises(ImportFailed, match=match):
            import_file(api.sessions, slug, path, **kw)
        assert _counts(api) == before

    # an export of a 64-latent KronSAE into a 48-latent TopK SAE
    refused(export, "tiny-topk", "d_sae = 64.*another SAE")
    # a bad line after good ones, features and activations included: nothing at all
    zbuf = io.BytesIO()
    with zipfile.ZipFile(export) as src, zipfile.ZipFile(zbuf, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("kronscope-parents/extension/explanations/batch-0.jsonl") or (
                info.filename.endswith("extension/features/batch-0.jsonl")
            ):
                data += b'{"index": 4, "description": \n'
            dst.writestr(info, data)
    broken = tmp_path / "broken.zip"
    broken.write_bytes(zbuf.getvalue())
    refused(
        broken,
        "tiny-kron-2",
        r"extension/(features|explanations)/batch-0.jsonl:\d+: not valid JSON",
    )
    # Neuronpedia records of another model / hook / size
    refused(
        neuronpedia_folder(tmp_path / "m", model="gpt2-small"), "tiny-topk", "model 'gpt2-small'"
    )
    refused(neuronpedia_folder(tmp_path / "h", hook="blocks.6.hook_resid_pre"), "tiny-topk", "hook")
    refused(
        neuronpedia_folder(tmp_path / "i", index=48),
        "tiny-topk",
        "index 48 is out of range.*another SAE",
    )
    assert import_file(api.sessions, "tiny-topk", neuronpedia_folder(tmp_path / "ok", model="gpt2-small"),
                       allow_mismatch=True).explanations == 2  # fmt: skip
    before = _counts(api)
    # shapes that are not an export at all
    junk = tmp_path / "junk.jsonl"
    for content, match in (
        (b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8|not valid JSON"),
        (b"[1, 2, 3]\n", "must be a JSON object"),
        (b'{"index": "1"}\n', "cannot tell"),
        (b'{"type": "explanation", "index": "1", "description": ""}\n', "non-empty 'description'"),
        (
            b'{"type": "activation", "index": "1", "tokens": ["a"], "values": [1, 2]}\n',
            "as long as",
        ),
        (b'{"type": "feature", "index": "x1"}\n', "whole number"),
        (b'{"type": "feature", "index": "1", "frac_nonzero": NaN}\n', "not valid JSON"),
        (b'{"type": "wat", "index": "1"}\n', "unknown record type"),
    ):
        junk.write_bytes(content)
        refused(junk, "tiny-topk", match)
    gz = tmp_path / "bad.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"index": "1", "description": "x"}\n')[:-12])
    refused(gz, "tiny-topk", "cannot be read")
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("README.md", "nothing here")
    refused(empty, "tiny-topk", "no features, explanations or activations")
    two = tmp_path / "two.jsonl"
    two.write_text(
        '{"type": "explanation", "layer": "a", "index": "1", "description": "x"}\n'
        '{"type": "explanation", "layer": "b", "index": "1", "description": "y"}\n'
    )
    refused(two, "tiny-topk", "several sources")
    refused(tmp_path / "missing.zip", "tiny-topk", "does not exist")
    refused(export, "no-such-sae", "no SAE named")
    # the CLI says the same, with exit code 2
    url = api.engine_db.url.render_as_string(hide_password=False)
    out = CliRunner().invoke(cli_app, ["import", str(export), "--sae", "tiny-topk", "--url", url])
    assert (
        out.exit_code == 2 and "another SAE" in out.output and "Nothing was written" in out.output
    )
    assert _counts(api) == before


def test_export_options_and_errors(world: Api) -> None:
    api = world
    r = api.client.get(
        EXPORT.format("tiny-kron"), params={"sections": "explanations", "parents": False}
    )
    names = zipfile.ZipFile(io.BytesIO(r.content)).namelist()
    assert sorted(n.split("/", 2)[2] for n in names) == [
        "explanations/batch-0.jsonl", "kronscope.json", "model.jsonl", "source.jsonl",
    ]  # fmt: skip
    assert (
        api.client.get(EXPORT.format("tiny-kron"), params={"sections": "bogus"}).status_code == 422
    )
    assert api.client.get(EXPORT.format("tiny-kron"), params={"format": "xml"}).status_code == 422
    assert api.client.get(EXPORT.format("nope")).status_code == 404
    # no harvest: explanations only, still a valid zip
    api.client.post(
        "/api/v1/saes/tiny-topk/latents/2/explanations", json={"text": "t"}, headers=api.headers
    )
    names = zipfile.ZipFile(
        io.BytesIO(api.client.get(EXPORT.format("tiny-topk")).content)
    ).namelist()
    assert [n.split("/", 2)[2] for n in names if "batch" in n] == ["explanations/batch-0.jsonl"]
