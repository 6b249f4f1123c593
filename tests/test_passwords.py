"""Tests for gateway.passwords: both hash schemes, malformed hashes, tokens and the entropy estimate."""

from __future__ import annotations

import math
import re

import pytest

from gateway import passwords

ARGON_SECRET = "kört ☃ horse battery"


@pytest.fixture(scope="module")
def argon_hash() -> str:
    # argon2id with production parameters costs ~0.3 s per hash or verify here: keep the count low
    return passwords.hash_password(ARGON_SECRET)


# --- hash and verify ------------------------------------------------------------------------------


@pytest.mark.parametrize("secret", ["s3cr3t-Device-Key_0123456789abcd", "kört-ünïcode ☃", " spaced ", ""])
def test_sha256_round_trip(secret: str) -> None:
    stored = passwords.hash_secret(secret)
    assert stored.startswith("sha256$")
    assert passwords.verify(stored, secret) is True


@pytest.mark.parametrize(
    "wrong",
    [
        "",
        "s3cr3t-device-key",
        "s3cr3t-Device-Key ",
        " s3cr3t-Device-Key",
        "s3cr3t-Device-Ke",
        "s3cr3t-Device-Keyx",
        "S3CR3T-DEVICE-KEY",
        "ş3cr3t-Device-Key",
    ],
)
def test_sha256_wrong_candidate(wrong: str) -> None:
    assert passwords.verify(passwords.hash_secret("s3cr3t-Device-Key"), wrong) is False


def test_sha256_is_salted() -> None:
    first, second = passwords.hash_secret("same"), passwords.hash_secret("same")
    assert first != second
    assert passwords.verify(first, "same")
    assert passwords.verify(second, "same")


def test_argon2_round_trip_and_wrong_password(argon_hash: str) -> None:
    assert argon_hash.startswith("$argon2id$")
    assert ARGON_SECRET not in argon_hash
    assert passwords.verify(argon_hash, ARGON_SECRET) is True
    assert passwords.verify(argon_hash, ARGON_SECRET[:-1]) is False


def test_argon2_is_salted(argon_hash: str) -> None:
    assert passwords.hash_password(ARGON_SECRET) != argon_hash


def test_sha256_hash_format() -> None:
    stored = passwords.hash_secret("x")
    assert re.fullmatch(r"sha256\$[0-9a-f]{32}\$[0-9a-f]{64}", stored), stored


SHA_OK = passwords.hash_secret("abc")
_, SALT, DIGEST = SHA_OK.split("$")


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "abc",
        "plain-text-password",
        "sha256",
        "sha256$",
        "sha256$$",
        f"sha256${SALT}",
        f"sha256${SALT}$",
        f"sha256${SALT}${DIGEST}$extra",
        f"sha256$zz{SALT[2:]}${DIGEST}",  # salt is not hex
        f"sha256${SALT[:-1]}${DIGEST}",  # odd-length salt
        f"sha256${SALT}${DIGEST[:-1]}",  # truncated digest
        f"sha256${SALT}${DIGEST.upper()}",  # we only ever write lower case
        f"SHA256${SALT}${DIGEST}",
        f"md5${SALT}${DIGEST}",
        "$argon2",
        "$argon2id$",
        "$argon2id$garbage",
        "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$",
        "$argon2id$v=19$m=65536,t=3,p=4$!!!!$!!!!",
        "$2b$12$abcdefghijklmnopqrstuv",  # bcrypt: not ours
    ],
)
def test_malformed_hash_is_false_not_an_exception(stored: str) -> None:
    assert passwords.verify(stored, "abc") is False


def test_truncated_argon2_hash_is_false(argon_hash: str) -> None:
    for cut in (10, len(argon_hash) // 2, len(argon_hash) - 5):
        assert passwords.verify(argon_hash[:cut], ARGON_SECRET) is False


def test_non_ascii_digest_is_false_not_an_exception() -> None:
    assert passwords.verify(f"sha256${SALT}$é", "abc") is False


# --- tokens ---------------------------------------------------------------------------------------


def test_generate_token_and_token_hash() -> None:
    token = passwords.generate_token()
    assert re.fullmatch(r"bsn_[A-Za-z0-9_-]{43}", token), token
    assert passwords.generate_token() != token
    digest = passwords.token_hash(token)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert passwords.token_hash(token) == digest  # a stable lookup key
    assert passwords.token_hash(token + "x") != digest


def test_generate_secret_shape_and_uniqueness() -> None:
    made = {passwords.generate_secret() for _ in range(200)}
    assert len(made) == 200
    for secret in made:
        assert re.fullmatch(r"[A-Za-z0-9_-]{32}", secret), secret


# --- entropy_bits ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("password", "bits"),
    [
        ("", 0.0),
        ("a" * 40, 0.0),  # repetition is not randomness
        ("x" * 21 + "Y0", 0.0),
        ("Password123!", 0.0),  # 11 distinct characters
        ("abcdefghijkl", 12 * math.log2(26)),
        ("ABCDEFGHIJKLmn", 14 * math.log2(52)),
        ("0123456789ab", 12 * math.log2(36)),
        ("abcdefghijk!", 12 * math.log2(58)),
        ("abcdefghijké", 12 * math.log2(58)),  # anything outside [A-Za-z0-9] counts as a symbol
    ],
)
def test_entropy_bits(password: str, bits: float) -> None:
    assert passwords.entropy_bits(password) == pytest.approx(bits)


@pytest.mark.parametrize(
    ("password", "strong_enough"),
    [
        ("password123", False),
        ("Tr0ub4dor&3", False),
        ("P@ssw0rd!2024", False),
        ("aB3_eF6-hI9_kL2-nO5_qR", True),  # 22 characters of [A-Za-z0-9_-]: the registry's advice
        (passwords.generate_secret(), True),
    ],
)
def test_min_device_bits_threshold(password: str, strong_enough: bool) -> None:
    assert (passwords.entropy_bits(password) >= passwords.MIN_DEVICE_BITS) is strong_enough


def test_generated_secrets_always_pass_min_device_bits() -> None:
    for _ in range(500):
        secret = passwords.generate_secret()
        assert passwords.entropy_bits(secret) >= passwords.MIN_DEVICE_BITS, secret


def test_min_device_bits_value() -> None:
    assert passwords.MIN_DEVICE_BITS == 128
    # 21 characters of [A-Za-z0-9] fall short, 22 are enough: the registry's error message relies on this
    assert passwords.entropy_bits("abcdefghijkLMNOPQRS123"[:21]) < passwords.MIN_DEVICE_BITS
    assert passwords.entropy_bits("abcdefghijkLMNOPQRS123") >= passwords.MIN_DEVICE_BITS
