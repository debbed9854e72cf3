"""schemas/secret.py: `SecretData` made from a cached JSON document decodes only when read, and
still never prints or pickles its values."""

from __future__ import annotations

import json
import pickle

import pytest

from schemas.secret import REDACTED, SecretData

PATH = "app/db"
CANARY = "canary-5e0b-hot-path"


def test_secret_data_from_a_document_decodes_only_when_read() -> None:
    document = json.dumps({"path": PATH, "version": 3, "data": {"password": CANARY}}).encode()
    data = SecretData.from_document(document)
    assert data._data is None  # nothing decoded yet: the cache holds the bytes only
    assert data == {"password": CANARY}
    assert data["password"] == CANARY and list(data) == ["password"] and len(data) == 1
    assert data.reveal() == {"password": CANARY}
    assert data == SecretData({"password": CANARY})
    assert CANARY not in repr(data) and CANARY not in str(data) and REDACTED in repr(data)
    with pytest.raises(TypeError):
        pickle.dumps(data)
