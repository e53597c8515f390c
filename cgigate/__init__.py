"""cgigate: a CGI/FastCGI gateway daemon."""

__version__ = "0.1.0"
SERVER_SOFTWARE = f"cgigate/{__version__}"
