"""Real peers and harnesses the tests drive: dcmtk (storescu/storescp), Orthanc, OHIF, PostgreSQL,
`plugin serve` as a process, raw DICOM associations, and sample objects for the output builders."""
