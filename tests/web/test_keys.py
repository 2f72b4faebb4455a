"""Keys in the browser: entered once, kept in a signed httpOnly cookie, attached to the
pages' API writes only with the CSRF token; revoked keys get a plain message."""

from __future__ import annotations

from collections.abc import Callable

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from kronscope.app import create_app
from kronscope.config import Settings
from kronscope.db.repositories import keys

from .conftest import Keys, World, csrf_of, read_page, sign_in


def _explanations_url(world: World, index: int) -> str:
    return f"/api/v1/saes/{world.kron}/latents/{index}/explanations"


def _texts(client: TestClient, world: World, index: int) -> list[str]:
    return [e["text"] for e in client.get(_explanations_url(world, index)).json()["items"]]


def test_entering_a_key_signs_the_browser_in(client: TestClient, web_keys: Keys) -> None:
    before = read_page(client, "/")
    assert before.soup.select_one(".key-link").get_text(strip=True) == "Enter API key"
    response = client.post(
        "/key",
        data={
            "api_key": web_keys.all,
            "csrf_token": csrf_of(read_page(client, "/key")),
            "next": "/",
        },
        follow_redirects=False,
    )
    assert response.status_code == 303 and response.headers["location"] == "/"
    set_cookie = response.headers["set-cookie"].lower()
    assert (
        "kronscope_session=" in set_cookie
        and "httponly" in set_cookie
        and "samesite=lax" in set_cookie
    )
    page = read_page(client, "/")
    assert page.soup.select_one(".key-link").get_text(strip=True) == "Key: web-tester"
    assert "Signed in with the key 'web-tester'." in page.soup.select_one(".flash").get_text()
    assert web_keys.all not in page.html  # the key itself never reaches a page
    key_page = read_page(client, "/key")
    assert "This browser uses the key web-tester" in key_page.text
    assert "explanations" in key_page.text


def test_a_wrong_key_is_refused_in_plain_words(client: TestClient) -> None:
    page = read_page(client, "/key")
    response = client.post(
        "/key", data={"api_key": "ks_not-a-real-key", "csrf_token": csrf_of(page)}
    )
    assert response.status_code == 422
    assert "That key is not valid: it is unknown or has been revoked." in response.text
    assert (
        read_page(client, "/").soup.select_one(".key-link").get_text(strip=True) == "Enter API key"
    )


def test_key_forms_need_the_csrf_token(client: TestClient, web_keys: Keys) -> None:
    read_page(client, "/key")
    response = client.post("/key", data={"api_key": web_keys.all, "csrf_token": "forged"})
    assert response.status_code == 403
    assert "security token (CSRF)" in response.text
    assert (
        read_page(client, "/").soup.select_one(".key-link").get_text(strip=True) == "Enter API key"
    )
    token = sign_in(client, web_keys.all)
    assert client.post("/key/forget", data={}).status_code == 403
    assert (
        client.post("/key/forget", data={"csrf_token": token}, follow_redirects=False).status_code
        == 303
    )
    assert (
        read_page(client, "/").soup.select_one(".key-link").get_text(strip=True) == "Enter API key"
    )


def test_sign_in_redirects_only_within_the_site(client: TestClient, web_keys: Keys) -> None:
    token = csrf_of(read_page(client, "/key"))
    away = client.post(
        "/key",
        data={"api_key": web_keys.all, "csrf_token": token, "next": "//evil.example/x"},
        follow_redirects=False,
    )
    assert away.headers["location"] == "/"


def test_page_writes_need_the_csrf_header(client: TestClient, world: World, web_keys: Keys) -> None:
    token = sign_in(client, web_keys.all)
    url = _explanations_url(world, 2)
    refused = client.post(url, json={"text": "forged by another site"})
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "csrf_failed"
    wrong = client.post(
        url, json={"text": "forged by another site"}, headers={"X-CSRF-Token": "guess"}
    )
    assert wrong.status_code == 403
    cross = client.post(
        url,
        json={"text": "cross-site"},
        headers={"X-CSRF-Token": token, "Origin": "https://evil.example"},
    )
    assert cross.status_code == 403
    assert "forged by another site" not in _texts(client, world, 2)

    made = client.post(url, json={"text": "made in the browser"}, headers={"X-CSRF-Token": token})
    assert made.status_code == 201, made.text
    assert made.json()["author"] == "web-tester"  # the session's key did the write
    edited = client.put(
        f"{url}/{made.json()['id']}",
        json={"text": "edited in the browser"},
        headers={"X-CSRF-Token": token},
    )
    assert edited.status_code == 200
    page = read_page(client, f"/saes/{world.kron}/latents/2")
    assert "edited in the browser" in page.soup.select_one(".expl-text").get_text()
    assert "History (2 versions)" in page.text and "made in the browser" in page.text


def test_without_a_key_writes_get_401(client: TestClient, world: World) -> None:
    token = csrf_of(read_page(client, "/"))
    response = client.post(
        _explanations_url(world, 3), json={"text": "x"}, headers={"X-CSRF-Token": token}
    )
    assert response.status_code == 401


def test_explicit_api_credentials_bypass_the_cookie(
    client: TestClient, world: World, web_keys: Keys
) -> None:
    sign_in(client, web_keys.readonly)  # the cookie's key cannot write explanations...
    response = client.post(
        _explanations_url(world, 4),
        json={"text": "from a script"},
        headers={"Authorization": f"Bearer {web_keys.all}"},
    )
    assert response.status_code == 201  # ...the header's key can, and needs no CSRF token
    assert response.json()["author"] == "web-tester"
    cookie_only = client.post(
        _explanations_url(world, 4),
        json={"text": "no scope"},
        headers={"X-CSRF-Token": csrf_of(read_page(client, "/"))},
    )
    assert cookie_only.status_code == 403
    assert "lacks the 'explanations' scope" in cookie_only.json()["error"]["message"]


def test_a_revoked_key_gets_a_clear_message(
    client: TestClient, world: World, web_keys: Keys, db_factory: sessionmaker[Session]
) -> None:
    token = sign_in(client, web_keys.revoked)
    with db_factory() as s:
        keys.revoke_key(s, web_keys.revoked_id)
        s.commit()
    # A write from a page still open: the API says the key is not valid.
    response = client.post(
        _explanations_url(world, 1), json={"text": "x"}, headers={"X-CSRF-Token": token}
    )
    assert response.status_code == 401
    assert "not valid (unknown or revoked)" in response.json()["error"]["message"]
    # The next page says so in plain words and forgets the key.
    page = read_page(client, "/")
    assert (
        "no longer valid: it was revoked or is unknown" in page.soup.select_one(".flash").get_text()
    )
    assert page.soup.select_one(".key-link").get_text(strip=True) == "Enter API key"


def test_pages_can_require_a_key_to_read(
    make_settings: Callable[..., Settings], world: World, web_keys: Keys
) -> None:
    with TestClient(
        create_app(make_settings(require_key_for_reads=True)), raise_server_exceptions=False
    ) as client:
        page = read_page(client, f"/saes/{world.kron}")
        assert page.status == 401
        assert "only with an API key" in page.text
        assert page.links()["Enter an API key"].startswith("/key?next=")
        sign_in(client, web_keys.readonly)
        assert read_page(client, f"/saes/{world.kron}").status == 200
        # The pages' own API reads carry the cookie's key too.
        assert client.get(f"/api/v1/saes/{world.kron}").status_code == 200
