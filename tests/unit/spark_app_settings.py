"""Settings shared by the spark_app unit tests."""

from __future__ import annotations

from orchard.core.settings import Settings

CFG = Settings(  # explicit values: the caller's ORCHARD_* environment does not leak in
    s3_endpoint="http://s3",
    s3_access_key="ak",
    s3_secret_key="sk",
    es_hosts="http://es",
    images_bucket="images",
    images_index="orchard-images",
)
