echo "no shebang line"
