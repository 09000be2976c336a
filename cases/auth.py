"""Instructor password hashing: salted scrypt, self-describing strings, constant-time comparison."""

from __future__ import annotations

import hashlib
import hmac
import secrets

SCRYPT_N = 2**14  # CPU/memory cost (16 MiB with r=8)
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
KEY_BYTES = 32
MIN_PASSWORD_LENGTH = 10


def hash_password(password: str) -> str:
    """Return 'scrypt$n$r$p$salt_hex$key_hex' for a password of at least MIN_PASSWORD_LENGTH chars."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"instructor passwords need at least {MIN_PASSWORD_LENGTH} characters")
    salt = secrets.token_bytes(SALT_BYTES)
    key = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${key.hex()}"


def verify_password(password: str, stored: str) -> bool:
    """True when `password` matches a hash made by `hash_password` (constant-time compare)."""
    try:
        scheme, n, r, p, salt_hex, key_hex = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    key = _scrypt(password, bytes.fromhex(salt_hex), int(n), int(r), int(p))
    return hmac.compare_digest(key, bytes.fromhex(key_hex))


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=KEY_BYTES, maxmem=64 * 1024 * 1024
    )
