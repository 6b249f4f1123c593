"""Secrets and their hashes: fast salted hashes for high-entropy device secrets and tokens, argon2 for people.

A generated device secret carries 192 bits, so one salted SHA-256 is enough and 1,000 devices reconnecting
after a power cut are verified in milliseconds. Passwords a person chooses (crew, integrations) use argon2id.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import string

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

__all__ = [
    "MIN_DEVICE_BITS",
    "entropy_bits",
    "generate_secret",
    "generate_token",
    "hash_password",
    "hash_secret",
    "token_hash",
    "verify",
]

MIN_DEVICE_BITS = 128
_ARGON = PasswordHasher()


def generate_secret() -> str:
    """192 random bits, URL-safe (32 characters)."""
    return secrets.token_urlsafe(24)


def generate_token() -> str:
    return "bsn_" + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """API tokens are 256-bit random strings: an unsalted SHA-256 is a safe lookup key."""
    return hashlib.sha256(token.encode()).hexdigest()


def entropy_bits(password: str) -> float:
    """An estimate of a password's entropy: length x log2(size of the character classes it uses), and 0 for
    strings with fewer than 12 distinct characters (repetition is not randomness: 'a' * 40 is not a secret)."""
    if len(set(password)) < 12:
        return 0.0
    pool = 0
    if any(c in string.ascii_lowercase for c in password):
        pool += 26
    if any(c in string.ascii_uppercase for c in password):
        pool += 26
    if any(c in string.digits for c in password):
        pool += 10
    if any(c not in string.ascii_letters + string.digits for c in password):
        pool += 32
    return len(password) * math.log2(pool) if pool else 0.0


def hash_secret(secret: str) -> str:
    """Salted SHA-256 for high-entropy secrets: `sha256$<salt hex>$<digest hex>`."""
    salt = secrets.token_bytes(16)
    digest = hashlib.sha256(salt + secret.encode()).hexdigest()
    return f"sha256${salt.hex()}${digest}"


def hash_password(password: str) -> str:
    """argon2id (memory-hard) for passwords people choose."""
    return _ARGON.hash(password)


def verify(stored: str, candidate: str) -> bool:
    """Check a candidate against any hash this module produced; never raises on a malformed hash."""
    if stored.startswith("sha256$"):
        try:
            _, salt_hex, digest = stored.split("$")
            salt = bytes.fromhex(salt_hex)
        except ValueError:
            return False
        computed = hashlib.sha256(salt + candidate.encode()).hexdigest()
        return hmac.compare_digest(computed.encode(), digest.encode())
    if stored.startswith("$argon2"):
        try:
            return _ARGON.verify(stored, candidate)
        except (VerificationError, InvalidHashError):
            return False
    return False
