"""Instructor password hashing: argon2id (argon2-cffi), with scrypt hashes of older libraries still read.

New hashes are argon2id strings (`$argon2id$v=19$m=...`). Hashes made before (`scrypt$n$r$p$salt$key`,
N=2^14) still verify, and `needs_rehash` tells the store to replace them at the next successful login.
`verify_dummy` does the same work as a real verification, so unknown usernames cost as much time as
known ones with a wrong password.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 1024  # longer inputs are refused before any hashing (no hashing DoS)
LEGACY_SCRYPT_MAXMEM = 64 * 1024 * 1024
_HASHER = PasswordHasher()  # argon2id, RFC 9106 low-memory profile: t=3, m=64 MiB, p=4


def hash_password(password: str) -> str:
    """An argon2id hash string for a password of MIN_PASSWORD_LENGTH..MAX_PASSWORD_LENGTH chars."""
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise ValueError(
            f"instructor passwords need {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters"
        )
    return _HASHER.hash(password)


def verify_password(password: str, stored: str) -> bool:
    """True when `password` matches an argon2id or legacy scrypt hash (constant-time compare)."""
    if len(password) > MAX_PASSWORD_LENGTH:
        return False
    if stored.startswith("scrypt$"):
        return _verify_scrypt(password, stored)
    try:
        return _HASHER.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(stored: str) -> bool:
    """True for scrypt hashes and argon2 hashes made with weaker parameters than today's."""
    if stored.startswith("scrypt$"):
        return True
    try:
        return _HASHER.check_needs_rehash(stored)
    except InvalidHashError:
        return True


def verify_dummy(password: str) -> bool:
    """Verify against a hash of a random secret: the same work as a real check, always False."""
    verify_password(password, _dummy_hash())
    return False


@functools.cache
def _dummy_hash() -> str:
    return _HASHER.hash(secrets.token_urlsafe(24))


def legacy_scrypt_hash(password: str, n: int = 2**14) -> str:
    """A scrypt hash in the old format (tests and migrations of old libraries only)."""
    salt = secrets.token_bytes(16)
    key = _scrypt(password, salt, n, 8, 1)
    return f"scrypt${n}$8$1${salt.hex()}${key.hex()}"


def _verify_scrypt(password: str, stored: str) -> bool:
    try:
        _scheme, n, r, p, salt_hex, key_hex = stored.split("$")
        key = _scrypt(password, bytes.fromhex(salt_hex), int(n), int(r), int(p))
    except ValueError:
        return False
    return hmac.compare_digest(key, bytes.fromhex(key_hex))


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32, maxmem=LEGACY_SCRYPT_MAXMEM
    )
