"""Orchard's Spark app: Elephas-wrapped Keras training, inference, features and search over s3a images.

Modules: session (SparkSession from settings), images (s3a read, key parsing, decode), preprocess
(numpy preprocessing by name, top-k), model (ALL TensorFlow/Keras/Elephas code), context (what
executors get: settings as a picklable dict, cached clients), sink (bulk updates from executors),
registry (model versions in the models bucket and index), train, transfer (a pretrained base + head),
bovw + descriptors (the bag-of-visual-words family: OpenCV SIFT/ORB, Spark ML), infer, features, search.
Nothing here imports TensorFlow, pyspark or OpenCV at import time except model.py and session.py.
"""

from orchard.spark_app.zip_imports import install as _install_lazy_zip_invalidation

# Executors' Python workers: each task otherwise re-reads every zip on sys.path (see zip_imports).
_install_lazy_zip_invalidation()
