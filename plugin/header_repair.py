"""Source headers made safe to copy into result objects.

The output builders copy the patient and study attributes of the analysed images into every
result object; an attribute received with another VR than the dictionary's (PatientName as
LO), or with a value its VR does not allow, makes highdicom fail, and with it the exam. Such
attributes are dropped here; the ones the result objects must carry (type 2) come back empty.
"""

from __future__ import annotations

from pydicom import Dataset
from pydicom.config import RAISE
from pydicom.datadict import dictionary_VR
from pydicom.valuerep import validate_value

# Type 2 in the Patient and General Study modules every result object carries.
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def copyable_header(ds: Dataset) -> tuple[Dataset, list[str]]:
    """`ds` (changed in place and returned) without top-level attributes the outputs cannot
    copy, and the keywords dropped (for the reason; never their values)."""
    dropped: list[str] = []
    for elem in list(ds):
        tag = elem.tag
        if tag.is_private or tag.group in (0x0002, 0x7FE0) or elem.VR == "SQ":
            continue
        try:
            expected = dictionary_VR(tag)
        except KeyError:
            continue
        try:
            value = elem.value
            wrong_vr = elem.VR != expected and elem.VR not in expected.split(" or ")
            if not wrong_vr and isinstance(value, (str, bytes)) and elem.VR != "UN":
                validate_value(elem.VR, value, RAISE)
        except Exception:  # noqa: BLE001 - any value pydicom cannot take is not copyable
            wrong_vr = True
        if wrong_vr:
            del ds[tag]
            dropped.append(elem.keyword or str(tag))
    for keyword in _TYPE2:
        if keyword in dropped:
            setattr(ds, keyword, "")
    return ds, dropped
