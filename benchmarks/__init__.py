"""Side-by-side benchmark of blobferry, rclone and the naive method on local emulators."""
