"""The job flow, on top: one job end to end (`worker`), the Runpod SDK's job loop around it
(`job_loop`) and the job API calls it makes (`job_api`)."""
