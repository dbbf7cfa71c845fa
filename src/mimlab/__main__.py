from mimlab.cli import main

raise SystemExit(main())
