"""How series reach the service: a DICOM listener (C-STORE SCP) or a follower of Orthanc's ``/changes`` feed."""
