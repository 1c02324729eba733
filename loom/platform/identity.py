"""Who is calling: API keys from `Authorization: Bearer` / `x-api-key`, and JWTs from `token`.

Owns reading the three credential headers into at most one credential (two different ones are
ambiguous: 400), checking a key against its stored hash, and verifying a JWT with the algorithm
pinned by the server (HS256 with `--jwt-secret`, or RS256 with `--jwt-public-key`), `exp` and
`sub` required, `nbf` / `iat` in the future refused. The server is open (no caller identity) only
while no key was ever created and no JWT verifier is configured. Never logs, stores or echoes a
credential: every refusal message is fixed text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loom.platform.keys import MAX_KEY_LEN, any_key, find_key
from loom.platform.ledger import find_account
from loom.platform.store import Database
from loom.platform.types import Principal, Refused

MAX_JWT_LEN = 8192
MIN_SECRET_LEN = 32  # HS256 is only as strong as its secret; RFC 7518 asks for at least 256 bits
JWT_LEEWAY_S = 5  # clock skew tolerated on exp / nbf / iat

INVALID_KEY = Refused("Invalid API key: it is unknown or has been revoked.")
INVALID_TOKEN = Refused("Invalid token: the JWT in the `token` header could not be verified.")
MISSING = Refused("This server needs an API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`.")
AMBIGUOUS = Refused("Send one credential: this request carries different values in its auth headers.", ambiguous=True)
BAD_SCHEME = Refused("The `Authorization` header must use the Bearer scheme: `Authorization: Bearer <key>`.")


@dataclass(frozen=True, slots=True)
class Credential:
    value: str
    is_jwt: bool


def read_credential(
    authorization: Sequence[str], api_keys: Sequence[str], tokens: Sequence[str]
) -> Credential | Refused | None:
    """The one credential in a request's headers (each list is every value of that header)."""
    keys: set[str] = set()
    for header in authorization:
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return BAD_SCHEME
        keys.add(value.strip())
    keys.update(value.strip() for value in api_keys)
    jwts = {value.strip() for value in tokens}
    if len(keys | jwts) > 1:
        return AMBIGUOUS
    if jwts:
        return Credential(jwts.pop(), is_jwt=True)
    if keys:
        return Credential(keys.pop(), is_jwt=False)
    return None


class JwtVerifier:
    """Verifies a JWT with one pinned algorithm and returns its `sub`."""

    def __init__(self, *, secret: str | None = None, public_key_file: str | Path | None = None) -> None:
        if (secret is None) == (public_key_file is None):
            raise ValueError("give exactly one of a JWT secret (HS256) or a public key file (RS256)")
        if secret is not None:
            if len(secret.encode()) < MIN_SECRET_LEN:
                raise ValueError(f"the JWT secret must be at least {MIN_SECRET_LEN} bytes")
            self._key: object = secret
            self.algorithm = "HS256"
        else:
            from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
            from cryptography.hazmat.primitives.serialization import load_pem_public_key

            try:
                key = load_pem_public_key(Path(str(public_key_file)).read_bytes())
            except (OSError, ValueError) as exc:
                raise ValueError(f"cannot read an RSA public key from {public_key_file}: {exc}") from None
            if not isinstance(key, RSAPublicKey):
                raise ValueError(f"{public_key_file} is not an RSA public key (RS256 needs one)")
            self._key = key
            self.algorithm = "RS256"
        # PyJWT (and the cryptography it loads) is imported only here: ~0.1 s of a start-up without JWTs
        import jwt

        self._jwt = jwt

    def subject(self, token: str) -> str | None:
        """`sub` of a valid token, None for any invalid one (the reason is never shown)."""
        if len(token) > MAX_JWT_LEN:
            return None
        try:
            claims = self._jwt.decode(
                token,
                self._key,  # type: ignore[arg-type]
                algorithms=[self.algorithm],
                options={"require": ["exp", "sub"], "verify_signature": True},
                leeway=JWT_LEEWAY_S,
            )
        except self._jwt.PyJWTError:
            return None
        sub = claims.get("sub")
        return sub if isinstance(sub, str) and sub else None


class Authenticator:
    """Credential -> `Principal`, or `Refused`, or None while the server is open."""

    def __init__(self, db: Database, verifier: JwtVerifier | None = None) -> None:
        self.db = db
        self.verifier = verifier

    def is_open(self) -> bool:
        """No identity is required: no JWT verifier and no key (one query: keys may be created while serving)."""
        return self.verifier is None and not any_key(self.db)

    def authenticate(self, credential: Credential | Refused | None) -> Principal | Refused | None:
        if isinstance(credential, Refused):
            return None if self.is_open() else credential
        if credential is None:
            return None if self.is_open() else MISSING
        if credential.is_jwt:
            if self.verifier is None:
                return None if self.is_open() else INVALID_TOKEN
            return self._from_jwt(credential.value, self.verifier)
        return self._from_key(credential.value)

    def _from_key(self, key: str) -> Principal | Refused | None:
        row = find_key(self.db, key) if len(key) <= MAX_KEY_LEN else None
        if row is None or row.revoked:
            return None if self.is_open() else INVALID_KEY
        return Principal(
            account_id=row.account_id,
            account_name=row.account_name,
            key_id=row.id,
            key_prefix=row.prefix,
            rpm=row.rpm,
            tpm=row.tpm,
            models=row.models,
        )

    def _from_jwt(self, token: str, verifier: JwtVerifier) -> Principal | Refused:
        sub = verifier.subject(token)
        account = find_account(self.db, sub) if sub is not None else None
        if account is None:
            return INVALID_TOKEN
        return Principal(account_id=account.id, account_name=account.name)
