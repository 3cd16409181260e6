"""Data: tokenizer, image preprocessing, sample building, the collate, the dataset providers and the
one batching path (``stream.MicroBatchStream``). Importing this package registers the built-in
providers (``mock``, ``webdataset``)."""
from multimodal_dev.data.collate import (  # noqa: F401
    IGNORE_INDEX,
    CollateConfig,
    mrope_position_ids,
    pack_or_pad_batch,
    required_seq_multiple,
)
from multimodal_dev.data.image import ImageDecodeError, decode_image, preprocess_image, smart_resize  # noqa: F401
from multimodal_dev.data.providers import (  # noqa: F401
    DataConfig,
    DatasetProvider,
    SampleIterator,
    available_providers,
    build_provider,
    get_provider,
    register_provider,
)
from multimodal_dev.data import mock, webdataset  # noqa: F401,E402  (register the built-in providers)
from multimodal_dev.data.sample import SampleError, build_sample  # noqa: F401
from multimodal_dev.data.stream import MicroBatchStream  # noqa: F401
from multimodal_dev.data.tokenizer import TextTokenizer  # noqa: F401
