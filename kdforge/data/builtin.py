"""The built-in data sources, registered through the same hook as third-party ones."""

from __future__ import annotations

from kdforge.data.demo_gallery import DemoGallerySource
from kdforge.data.embedded import DigitsSource, SingleImageSource
from kdforge.data.image_folder import ImageFolderSource
from kdforge.data.image_mixer import ImageMixerSource
from kdforge.data.mixture import MixtureSource
from kdforge.data.procedural import ProceduralSource
from kdforge.data.retrieved import RetrievedSource
from kdforge.data.shards import WebDatasetSource
from kdforge.data.subsets import FewShotSource
from kdforge.plugins import hookimpl


@hookimpl
def kdforge_register_data_sources() -> list[type]:
    return [ImageFolderSource, WebDatasetSource, ProceduralSource, DigitsSource, SingleImageSource,
            FewShotSource, MixtureSource, ImageMixerSource, RetrievedSource, DemoGallerySource]
