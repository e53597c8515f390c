from cgigate.cli import main

raise SystemExit(main())
