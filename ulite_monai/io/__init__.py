from .sitk_reader import SITKReader, read_sitk_image  # noqa: F401
from .dicom_series import DicomSeries, SeriesRejectedError, SeriesVolume, discover_inputs, load_series_volume  # noqa: F401
from .dicom_seg import segments_from_channel_def, write_dicom_seg  # noqa: F401
from .series_selection import SeriesSelector, load_selection_rules  # noqa: F401
