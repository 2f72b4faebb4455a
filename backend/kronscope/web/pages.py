"""Browse pages: home (the SAEs), an SAE's latent browser, a latent, a parent, a head.

Every page is assembled by ``services.features`` (the same dicts the JSON API returns), so
pages and API agree; this module only turns them into view models (``views``) and
templates. Filters and pagination are query parameters, so every view is a deep link.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.responses import RedirectResponse, Response

from ..db.repositories import jobs as job_repo
from ..db.repositories import saes as sae_repo
from ..services import explanations as expl_svc
from ..services import features, sae_registry
from ..services.errors import NotFound
from ..services.jobs import job_dict
from . import views
from .context import MAX_PREFILL, PageDep, parse_index

router = APIRouter(include_in_schema=False)

PAGE_SIZE = 50
HOME_PAGE_SIZE = 100
FINISHED = ("complete", "failed", "cancelled")


def _page_number(raw: str | None) -> int:
    try:
        return max(1, int(raw or 1))
    except ValueError:
        return 1


# -- home --------------------------------------------------------------------------------------------
@router.get("/")
def home(page: PageDep, p: str | None = None) -> Response:
    number = _page_number(p)
    listing = sae_repo.list_saes(
        page.session, limit=HOME_PAGE_SIZE, offset=(number - 1) * HOME_PAGE_SIZE
    )
    saes = [features.sae_dict(page.session, s) for s in listing.items]
    return page.render(
        "home.html",
        saes=saes,
        total=listing.total,
        page_number=number,
        pages=max(1, -(-listing.total // HOME_PAGE_SIZE)),
    )


# -- one SAE: its latent browser ---------------------------------------------------------------------
SORT_LABELS = {"index": "index", "density": "density", "max_activation": "max activation"}


def _browse_params(
    sae: dict[str, Any], raw: dict[str, str | None]
) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """Lenient parsing of the browser's form: ``(service arguments, form values, errors)``.

    Empty fields mean "no filter"; a wrong value is named in plain words and ignored."""
    errors: list[str] = []
    form = {k: (v or "").strip() for k, v in raw.items()}
    args: dict[str, Any] = {}
    sort = form["sort"] or "index"
    if sort not in SORT_LABELS:
        errors.append(f"Sort must be one of {', '.join(SORT_LABELS)}.")
        sort = "index"
    form["sort"] = sort
    args["sort"] = sort
    if form["order"] in ("asc", "desc"):
        args["order"] = form["order"]
    elif form["order"]:
        errors.append("Order must be asc or desc.")
        form["order"] = ""
    for name, label in (("min_density", "Minimum density"), ("max_density", "Maximum density")):
        if not form[name]:
            continue
        text = form[name]
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            value = None
        if value is None or not 0 <= value <= 1:
            errors.append(
                f"{label} must be a fraction between 0 and 1 (or a percentage like 0.5%), not {text!r}."
            )
            form[name] = ""
        else:
            args[name] = value
    if form["head"]:
        h = sae.get("h")
        if not h:
            errors.append("This SAE is not a KronSAE, so it has no heads to filter by.")
            form["head"] = ""
        elif not form["head"].isdigit() or int(form["head"]) >= h:
            errors.append(f"Head must be a whole number from 0 to {h - 1}.")
            form["head"] = ""
        else:
            args["head"] = int(form["head"])
    if form["explained"] in ("yes", "no"):
        args["has_explanation"] = form["explained"] == "yes"
    else:
        form["explained"] = ""
    if form["q"]:
        args["q"] = form["q"][:500]
    return args, form, errors


@router.get("/saes/{slug}")
def sae_page(
    page: PageDep,
    slug: str,
    sort: str | None = None,
    order: str | None = None,
    min_density: str | None = None,
    max_density: str | None = None,
    head: str | None = None,
    explained: str | None = None,
    q: str | None = None,
    p: str | None = None,
) -> Response:
    sae_row = sae_registry.get_sae(page.session, slug)
    sae = features.sae_dict(page.session, sae_row)
    raw = {
        "sort": sort,
        "order": order,
        "min_density": min_density,
        "max_density": max_density,
        "head": head,
        "explained": explained,
        "q": q,
    }
    args, form, errors = _browse_params(sae, raw)
    number = _page_number(p)
    listing = features.list_latents(
        page.session, sae_row, limit=PAGE_SIZE, offset=(number - 1) * PAGE_SIZE, **args
    )
    pages = max(1, -(-listing["total"] // PAGE_SIZE))
    jobs = job_repo.list_jobs(page.session, sae_id=sae_row.id, limit=5).items
    return page.render(
        "sae.html",
        sae=sae,
        listing=listing,
        form=form,
        filters={k: v for k, v in form.items() if v and not (k == "sort" and v == "index")},
        errors=errors,
        page_number=number,
        pages=pages,
        sort_labels=SORT_LABELS,
        jobs=[job_dict(page.session, j) for j in jobs],
        finished=FINISHED,
    )


# -- one latent ---------------------------------------------------------------------------------------
def _examples(detail: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    stats = detail.get("stats") or {}
    scale = stats.get("max_activation") or None
    top = [views.example_view(e, scale) for e in detail["top_examples"]]
    intervals = [
        {**group, "examples": [views.example_view(e, scale) for e in group["examples"]]}
        for group in detail["sampled_examples"]
    ]
    return top, intervals


@router.get("/saes/{slug}/latents")
def latent_jump(page: PageDep, slug: str, index: str | None = None) -> Response:
    """The "go to latent" form: ``?index=N`` -> the latent's page."""
    sae_row = sae_registry.get_sae(page.session, slug)
    if index is None or not index.strip():
        return RedirectResponse(f"/saes/{sae_row.slug}", status_code=303)
    number = parse_index(index, "latent")
    return RedirectResponse(f"/saes/{sae_row.slug}/latents/{number}", status_code=303)


@router.get("/saes/{slug}/latents/{index}")
def latent_page(page: PageDep, slug: str, index: str) -> Response:
    sae_row = sae_registry.get_sae(page.session, slug)
    number = parse_index(index, "latent")
    detail = features.latent_detail(page.session, sae_row, number)
    sae = features.sae_dict(page.session, sae_row)
    top, intervals = _examples(detail)
    comp = detail["composition"]
    parents: dict[str, Any] = {}
    markers: list[tuple[str, float | None]] = [
        (f"latent {number}", (detail["stats"] or {}).get("density"))
    ]
    if comp is not None:
        for kind in ("base", "extension"):
            brief = comp[f"{kind}_parent"]
            parent = features.parent_detail(
                page.session, sae_row, kind, brief["head"], brief["index"], top_k=10, intervals=0
            )
            parents[kind] = {**brief, "top_tokens": views.top_tokens(parent["top_examples"])}
            markers.append((f"{kind} parent", (brief["stats"] or {}).get("density")))
    harvest = sae["active_harvest"] or {}
    return page.render(
        "latent.html",
        sae=sae,
        index=number,
        detail=detail,
        explanations=expl_svc.list_for_unit(
            page.session, sae_row, expl_svc.latent_unit(sae_row, number)
        )["items"],
        top=top,
        intervals=intervals,
        comp=comp,
        parents=parents,
        and_numbers=views.and_numbers(detail["stats"], harvest.get("tokens_seen")),
        histogram=views.histogram_chart(detail["histogram"]),
        density=views.density_chart(markers),
        can_explain=page.can("explanations"),
    )


# -- one parent ----------------------------------------------------------------------------------------
@router.get("/saes/{slug}/parents/{kind}/{head}/{index}")
def parent_page(page: PageDep, slug: str, kind: str, head: str, index: str) -> Response:
    sae_row = sae_registry.get_sae(page.session, slug)
    if kind not in ("base", "extension"):
        raise NotFound(f"There is no parent kind {kind!r}: parents are 'base' or 'extension'.")
    g, number = parse_index(head, "head"), parse_index(index, "parent")
    detail = features.parent_detail(page.session, sae_row, kind, g, number)  # type: ignore[arg-type]
    sae = features.sae_dict(page.session, sae_row)
    top, intervals = _examples(detail)
    size = sae["m"] if kind == "base" else sae["n"]
    markers: list[tuple[str, float | None]] = [
        (f"{kind} parent", (detail["stats"] or {}).get("density"))
    ]
    return page.render(
        "parent.html",
        sae=sae,
        kind=kind,
        head=g,
        index=number,
        size=size,
        detail=detail,
        explanations=expl_svc.list_for_unit(
            page.session, sae_row, expl_svc.parent_unit(sae_row, kind, g, number)
        )["items"],
        can_explain=page.can("explanations"),
        top=top,
        top_tokens=views.top_tokens(detail["top_examples"]),
        intervals=intervals,
        histogram=views.histogram_chart(detail["histogram"]),
        density=views.density_chart(markers),
    )


# -- one head ---------------------------------------------------------------------------------------------
@router.get("/saes/{slug}/heads")
def first_head(page: PageDep, slug: str) -> Response:
    sae_row = sae_registry.get_sae(page.session, slug)
    return RedirectResponse(f"/saes/{sae_row.slug}/heads/0", status_code=303)


@router.get("/saes/{slug}/heads/{head}")
def head_page(
    page: PageDep, slug: str, head: str, text: str | None = None, goto: str | None = None
) -> Response:
    sae_row = sae_registry.get_sae(page.session, slug)
    if goto is not None and goto.strip():  # the "go to head" form
        return RedirectResponse(
            f"/saes/{sae_row.slug}/heads/{parse_index(goto, 'head')}", status_code=303
        )
    g = parse_index(head, "head")
    grid = features.head_grid(page.session, sae_row, g)
    sae = features.sae_dict(page.session, sae_row)
    flat = [cell for row in grid["cells"] for cell in row]
    levels = views.heat_levels([c["density"] for c in flat], log=True)
    n = grid["n"]
    return page.render(
        "head.html",
        sae=sae,
        grid=grid,
        head=g,
        levels=[levels[i * n : (i + 1) * n] for i in range(grid["m"])],
        text=(text or "")[:MAX_PREFILL],
    )
