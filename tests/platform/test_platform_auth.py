"""Identity through the route dependencies: key headers, JWTs and their forgeries, revocation."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient
from platform_app import platform_app

from loom.platform import Platform
from loom.platform.keys import create_key, revoke_key

SECRET = "s" * 64
BODY = {"model": "m", "prompt": 10, "max_tokens": 5, "produce": 3}


def _post(client: TestClient, **headers: str) -> Any:
    return client.post("/v1/work", json=BODY, headers=headers)


def _assert_refused(response: Any, status: int, *secrets: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["type"] == ("authentication_error" if status == 401 else "invalid_request_error")
    for secret in secrets:
        assert secret not in response.text and all(secret not in v for v in response.headers.values())


def test_open_server_needs_no_credential_and_ignores_one(platform: Platform) -> None:
    with TestClient(platform_app(platform)) as client:
        assert _post(client).status_code == 200
        assert _post(client, authorization="Bearer unused").status_code == 200


def test_keys_in_either_header_and_any_scheme_case(platform: Platform) -> None:
    key, _ = create_key(platform.db, "acme")
    with TestClient(platform_app(platform)) as client:
        assert _post(client, authorization=f"Bearer {key}").status_code == 200
        assert _post(client, authorization=f"bearer {key}").status_code == 200
        assert _post(client, authorization=f"BEARER   {key}  ").status_code == 200
        assert _post(client, **{"x-api-key": key}).status_code == 200
        assert _post(client, authorization=f"Bearer {key}", **{"x-api-key": key}).status_code == 200  # same key twice


def test_missing_wrong_or_malformed_keys_are_401_without_echo(platform: Platform) -> None:
    key, _ = create_key(platform.db, "acme")
    wrong = key[:-4] + "AAAA"
    with TestClient(platform_app(platform)) as client:
        _assert_refused(_post(client), 401)
        _assert_refused(_post(client, authorization=f"Bearer {wrong}"), 401, wrong)
        _assert_refused(_post(client, authorization=f"Basic {key}"), 401, key)
        _assert_refused(_post(client, authorization="Bearer "), 401)
        _assert_refused(_post(client, **{"x-api-key": "k" * 5000}), 401, "k" * 300)
        assert client.get("/v1/usage").status_code == 401


def test_two_different_credentials_are_400(platform: Platform) -> None:
    key, _ = create_key(platform.db, "acme")
    other, _ = create_key(platform.db, "acme")
    with TestClient(platform_app(platform)) as client:
        _assert_refused(_post(client, authorization=f"Bearer {key}", **{"x-api-key": other}), 400, key, other)
        _assert_refused(_post(client, authorization=f"Bearer {key}", token="a.b.c"), 400, key)


def test_revoked_key_is_refused_from_its_next_request(platform: Platform) -> None:
    key, info = create_key(platform.db, "acme")
    create_key(platform.db, "other")
    with TestClient(platform_app(platform)) as client:
        assert _post(client, authorization=f"Bearer {key}").status_code == 200
        revoke_key(platform.db, info.prefix)
        _assert_refused(_post(client, authorization=f"Bearer {key}"), 401, key)


def test_revoking_the_only_key_does_not_open_the_server(platform: Platform) -> None:
    key, _ = create_key(platform.db, "acme")
    revoke_key(platform.db, key)
    with TestClient(platform_app(platform)) as client:
        _assert_refused(_post(client, authorization=f"Bearer {key}"), 401, key)
        _assert_refused(_post(client), 401)


def test_model_outside_the_keys_list_looks_like_an_unknown_model(platform: Platform) -> None:
    key, _ = create_key(platform.db, "acme", models=["m"])
    with TestClient(platform_app(platform)) as client:
        auth = {"authorization": f"Bearer {key}"}
        forbidden = client.post("/v1/work", json={**BODY, "model": "other"}, headers=auth)
        unknown = client.post("/v1/work", json={**BODY, "model": "nope"}, headers=auth)
        assert forbidden.status_code == unknown.status_code == 404
        assert forbidden.json()["error"]["code"] == unknown.json()["error"]["code"] == "model_not_found"


# ---- JWT -------------------------------------------------------------------------------------


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "acme", "iat": now, "exp": now + 300, **overrides}


@pytest.fixture
def rsa_keys(tmp_path: Path) -> tuple[Any, Path]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_file = tmp_path / "jwt.pub"
    public_file.write_bytes(
        private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public_file


def test_hs256_tokens_and_their_forgeries(make_platform: Callable[..., Platform]) -> None:
    platform = make_platform(jwt_secret=SECRET)
    create_key(platform.db, "acme")  # the account the tokens name
    now = int(time.time())
    with TestClient(platform_app(platform)) as client:
        assert _post(client, token=jwt.encode(_claims(), SECRET, algorithm="HS256")).status_code == 200
        forged = [
            jwt.encode(_claims(exp=now - 60), SECRET, algorithm="HS256"),  # expired
            jwt.encode(_claims(nbf=now + 600), SECRET, algorithm="HS256"),  # not yet valid
            jwt.encode(_claims(iat=now + 600), SECRET, algorithm="HS256"),  # issued in the future
            jwt.encode({"sub": "acme", "iat": now}, SECRET, algorithm="HS256"),  # no exp
            jwt.encode(_claims(), "x" * 40, algorithm="HS256"),  # another secret
            jwt.encode(_claims(), SECRET, algorithm="HS512"),  # another algorithm
            jwt.encode(_claims(sub="nobody"), SECRET, algorithm="HS256"),  # no such account
            jwt.encode(_claims(), None, algorithm="none"),  # unsigned
            "not.a.jwt",
        ]
        for token in forged:
            _assert_refused(_post(client, token=token), 401, token)


def test_rs256_tokens_and_algorithm_confusion(make_platform: Callable[..., Platform], rsa_keys: tuple[Any, Path]) -> None:
    private, public_file = rsa_keys
    platform = make_platform(jwt_public_key_file=str(public_file))
    create_key(platform.db, "acme")
    with TestClient(platform_app(platform)) as client:
        assert _post(client, token=jwt.encode(_claims(), private, algorithm="RS256")).status_code == 200
        # the public key used as an HMAC secret: the classic confusion attack
        token = _hs256_by_hand({"sub": "acme", "exp": int(time.time()) + 300}, public_file.read_bytes())
        _assert_refused(_post(client, token=token), 401, token)
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _assert_refused(_post(client, token=jwt.encode(_claims(), other, algorithm="RS256")), 401)


def _hs256_by_hand(claims: dict[str, Any], secret: bytes) -> str:
    """An HS256 token signed with any bytes (PyJWT refuses a PEM key as an HMAC secret)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + b64(json.dumps(claims).encode())
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def test_a_short_jwt_secret_is_refused_at_start(make_platform: Callable[..., Platform]) -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        make_platform(jwt_secret="short")
