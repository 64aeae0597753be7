from hdrlog.cli import main

raise SystemExit(main())
