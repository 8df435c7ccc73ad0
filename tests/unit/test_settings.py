"""Settings precedence: flags > ORCHARD_* env > credentials file > defaults."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from orchard.core.errors import ConfigError
from orchard.core.settings import load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for var in ("ORCHARD_S3_ACCESS_KEY", "ORCHARD_S3_SECRET_KEY", "ORCHARD_ES_HOSTS", "ORCHARD_ES_HEAP"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ORCHARD_HOME", str(tmp_path))


def test_defaults_derive_endpoints_from_ports(tmp_path):
    s = load_settings()
    assert s.home == tmp_path
    assert s.s3_url == "http://127.0.0.1:9000"
    assert s.es_urls == ["http://127.0.0.1:9200", "http://127.0.0.1:9201", "http://127.0.0.1:9202"]
    assert s.spark_master_url == "spark://127.0.0.1:7077"


def test_flag_beats_env_beats_default(monkeypatch):
    monkeypatch.setenv("ORCHARD_ES_HEAP", "2g")
    assert load_settings().es_heap == "2g"
    assert load_settings(es_heap="512m").es_heap == "512m"
    assert load_settings(es_heap=None).es_heap == "2g"  # an unset flag does not override


def test_credentials_file_is_read_and_env_wins(monkeypatch, tmp_path):
    (tmp_path / "credentials.env").write_text("ORCHARD_S3_ACCESS_KEY=fromfile\nORCHARD_S3_SECRET_KEY=s3cr3t\n")
    assert load_settings().s3_access_key.get_secret_value() == "fromfile"
    monkeypatch.setenv("ORCHARD_S3_ACCESS_KEY", "fromenv")
    assert load_settings().s3_access_key.get_secret_value() == "fromenv"


def test_secrets_are_not_shown_in_repr(tmp_path):
    (tmp_path / "credentials.env").write_text("ORCHARD_S3_SECRET_KEY=hunter2-secret\n")
    assert "hunter2-secret" not in repr(load_settings())


def test_missing_setting_names_the_variable():
    with pytest.raises(ConfigError, match="ORCHARD_S3_ACCESS_KEY"):
        load_settings().require("s3_access_key")


def test_secret_returns_the_value_or_names_the_unset_variable():
    assert load_settings(s3_secret_key="-s3 cr:3t").secret("s3_secret_key") == "-s3 cr:3t"
    with pytest.raises(ConfigError, match="ORCHARD_ES_PASSWORD"):
        load_settings().secret("es_password")
    with pytest.raises(TypeError, match="es_heap"):
        load_settings().secret("es_heap")


def test_invalid_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("ORCHARD_MINIO_PORT", "not-a-port")
    with pytest.raises(ConfigError, match="ORCHARD_MINIO_PORT"):
        load_settings()


def test_es_hosts_list_is_split_and_trimmed(monkeypatch):
    monkeypatch.setenv("ORCHARD_ES_HOSTS", "https://es01:9200, https://es02:9200,")
    assert load_settings().es_urls == ["https://es01:9200", "https://es02:9200"]


def test_settings_are_frozen():
    s = load_settings()
    with pytest.raises(ValidationError, match="frozen"):
        s.es_heap = "8g"


def test_settings_pickle_by_value_with_secrets_and_key_caches(monkeypatch):
    """Executors get the driver's Settings object itself: pickled, it comes back equal (secrets too)
    without reading the environment again, and it keys functools.lru_cache like the original."""
    import functools
    import pickle

    from pyspark import cloudpickle

    s = load_settings(s3_access_key="ak", s3_secret_key="sk", es_password="pw", es_ca_cert="/etc/ca.pem")
    shipped = pickle.dumps(s)
    monkeypatch.setenv("ORCHARD_IMAGES_INDEX", "changed-on-the-executor")
    for copy in (pickle.loads(shipped), cloudpickle.loads(cloudpickle.dumps(s))):
        assert copy == s and hash(copy) == hash(s)
        assert copy.s3_secret_key.get_secret_value() == "sk" and copy.es_password.get_secret_value() == "pw"
        assert copy.images_index == "orchard-images" and str(copy.es_ca_cert) == "/etc/ca.pem"

    @functools.lru_cache(maxsize=4)
    def client_of(settings):
        return object()

    assert client_of(pickle.loads(shipped)) is client_of(s)
    assert client_of(s.model_copy(update={"images_index": "other"})) is not client_of(s)


def test_credentials_file_written_after_loading_completes_the_settings(monkeypatch, tmp_path):
    """What `orchard stack up` does: settings loaded before the file existed, completed after."""
    from orchard.core.settings import with_credentials_file

    monkeypatch.setenv("ORCHARD_S3_SECRET_KEY", "fromenv")
    s = load_settings(es_heap="512m")
    assert with_credentials_file(s) is s  # no file yet
    (tmp_path / "credentials.env").write_text("ORCHARD_S3_ACCESS_KEY=fromfile\nORCHARD_S3_SECRET_KEY=s3cr3t\n")
    done = with_credentials_file(s)
    assert done.s3_access_key.get_secret_value() == "fromfile"
    assert done.s3_secret_key.get_secret_value() == "fromenv"  # exported variables still win
    assert done.es_heap == "512m" and done == load_settings(es_heap="512m")
