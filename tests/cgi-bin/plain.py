# Not executable: runs only through the [cgi] interpreters mapping for .py
print("Content-Type: text/plain")
print()
print("ran through the interpreter mapping")
